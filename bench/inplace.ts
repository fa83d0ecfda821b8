/**
 * bench/inplace: the data path alone, in one process, both regions populated up front, so the
 * only difference between cases is the send mode: plain PAGES frames without (bare) and with
 * the sender's dedup index kept, and in-place encoded PAGES_ENC (zero/dup/skip found in the
 * native send). Alternates the modes run by run.
 *   node dist/bench/inplace.js [--size 1GiB] [--runs 5] [--content mixed]
 */
import net from 'node:net';
import { once } from 'node:events';
import { parseArgs } from 'node:util';
import { addon } from '../src/native.js';
import { FrameType } from '../src/protocol/format.js';
import { FramedConnection } from '../src/protocol/connection.js';
import { SEND_DEDUP, SEND_ZERO } from '../src/protocol/wire.js';
import * as M from '../src/protocol/messages.js';
import { Region } from '../src/region/region.js';
import { UffdAsyncTracker } from '../src/tracking/index.js';
import { fillContent, type ContentName } from '../src/workload/content.js';
import { emit, machine, median } from './common.js';

const { values } = parseArgs({
  options: { size: { type: 'string', default: String(1 << 30) }, runs: { type: 'string', default: '5' }, content: { type: 'string', default: 'mixed' } },
});
const size = Number(values.size);
const V = 2;
emit({ bench: 'inplace', case: 'machine', ...machine(), region_bytes: size, content: values.content });
const src = Region.create(size, { name: 'inplace-src' });
await fillContent(src, values.content as ContentName, 1n);
const dst = Region.create(size, { name: 'inplace-dst' });
dst.populate();
const pages = src.pageCount;
const server = net.createServer({ pauseOnConnect: true });
server.listen(0, '127.0.0.1');
await once(server, 'listening');
const accepted = once(server, 'connection');
const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
await once(client, 'connect');
const [peer] = (await accepted) as [net.Socket];
const tx = FramedConnection.fromSocket(client);
const rx = FramedConnection.fromSocket(peer);
const all = Uint32Array.from({ length: pages }, (_, i) => i);
const zeroImage = (): BigUint64Array => new BigUint64Array(pages).fill(addon.zeroPageHash());
const bareHashes = new BigUint64Array(pages);
/** the same PAGES frames, in one native call per `n` pages (as the encoder's runs do) */
async function sendInCalls(
  n: number,
): Promise<{ bytes: number; zero: number; dup: number; skipped: number; raw: number; overheadMs: number; indexMs: number }> {
  const total = { bytes: 0, zero: 0, dup: 0, skipped: 0, raw: 0, overheadMs: 0, indexMs: 0 };
  for (let at = 0; at < pages; at += n) {
    const c = await tx.sendPages({ region: src, pages: all.subarray(at, at + n), round: 1, version: V, batchPages: 256, hashes: bareHashes });
    total.bytes += c.bytes;
    total.raw += c.raw;
  }
  return total;
}
const times: Record<string, number[]> = { bare: [], bare16: [], plain: [], inplace: [] };
for (let i = 0; i < Number(values.runs); i++) {
  for (const mode of ['bare', 'bare16', 'plain', 'inplace'] as const) {
    const txDedup = new addon.Dedup(pages);
    txDedup.initImage(zeroImage());
    const rxHashes = zeroImage();
    const tracker = new UffdAsyncTracker(src);
    await tracker.start();
    const got = rx.next(undefined, { region: dst, hashes: rxHashes, version: V, encodings: true });
    const t0 = performance.now();
    const c =
      mode === 'bare'
        ? await tx.sendPages({ region: src, pages: all, round: 1, version: V, batchPages: 256, hashes: new BigUint64Array(pages) })
        : mode === 'bare16'
          ? await sendInCalls(16 * 256)
          : mode === 'plain'
            ? await tx.sendPages({ region: src, pages: all, round: 1, version: V, batchPages: 256, hashes: new BigUint64Array(pages), dedup: txDedup })
            : await tx.sendPages({
                region: src,
                pages: all,
                round: 1,
                version: V,
                batchPages: 256,
                hashes: new BigUint64Array(pages),
                dedup: txDedup,
                flags: SEND_ZERO | SEND_DEDUP,
              });
    await tx.send(M.encodeRoundEnd({ round: 1, pages }, V));
    const f = await got;
    const ms = performance.now() - t0;
    await tracker.stop();
    if (f.type !== FrameType.RoundEnd) throw new Error('unexpected frame');
    times[mode]!.push(ms);
    emit({
      bench: 'inplace',
      case: 'run',
      mode,
      run: i,
      ms: +ms.toFixed(1),
      bytes: c.bytes,
      zero: c.zero,
      dup: c.dup,
      skipped: c.skipped,
      raw: c.raw,
      overhead_ms: +c.overheadMs.toFixed(1),
    });
  }
}
const p = median(times.plain!);
const q = median(times.inplace!);
emit({
  bench: 'inplace',
  case: 'summary',
  bare_ms: median(times.bare!),
  bare16_ms: median(times.bare16!),
  plain_ms: p,
  inplace_ms: q,
  inplace_over_plain: +(q / p).toFixed(3),
  runs: times.plain!.length,
});
tx.close();
rx.close();
server.close();
src.release();
dst.release();
