/**
 * What AES-256-GCM records cost through the OpenSSL Node ships (native/io/aead.h), one thread:
 * seal and open 1 GiB in records of each size. The budget of an encrypted data path (issue 17).
 *   node dist/bench/aead.js [--runs 5] [--records 16384,65536,262144,1048576]
 */
import { parseArgs } from 'node:util';
import { addon } from '../src/native.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, records: { type: 'string', default: '16384,65536,262144,1048576' } } });
const GIB = 2 ** 30;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
for (const rec of values.records!.split(',').map(Number)) {
  addon.aeadThroughput(64 << 20, rec); // warm: first touch of the buffers, the cipher's tables
  const runs = Array.from({ length: Number(values.runs) }, () => addon.aeadThroughput(GIB, rec));
  const seal = median(runs.map((r) => r.sealMs));
  const open = median(runs.map((r) => r.openMs));
  process.stdout.write(
    JSON.stringify({
      bench: 'aead',
      record_bytes: rec,
      seal_ms_per_gib: +seal.toFixed(1),
      open_ms_per_gib: +open.toFixed(1),
      seal_gb_s: +(GIB / 1e6 / seal).toFixed(2),
      open_gb_s: +(GIB / 1e6 / open).toFixed(2),
    }) + '\n',
  );
}
