/**
 * bench/flood-memory: whether a receiver keeps more memory with each connection flood (issue 29,
 * point 6). One receiver in this process (PSK), flooded `--rounds` times for `--seconds` each by
 * 64 loops from 127.0.0.1 that connect, send one byte and connect again once let go; after each
 * flood, 1 s of quiet and a forced full GC, then RssAnon, the JavaScript heap in use and the
 * open descriptors. Bounded means the figures level off instead of climbing round after round.
 *   node --expose-gc dist/bench/flood-memory.js [--rounds 5] [--seconds 3]
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, readdirSync } from 'node:fs';
import net from 'node:net';
import { parseArgs } from 'node:util';
import { listen } from '../src/receiver/listen.js';
import { emit, machine } from './common.js';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '5' }, seconds: { type: 'string', default: '3' } } });
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error('run with node --expose-gc');

const reading = (): { anon_mib: number; heap_used_mib: number; fds: number } => {
  const anon = /RssAnon:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
  return {
    anon_mib: +(Number(anon) / 1024).toFixed(1),
    heap_used_mib: +(process.memoryUsage().heapUsed / 2 ** 20).toFixed(1),
    fds: readdirSync('/proc/self/fd').length,
  };
};

async function flood(port: number, ms: number): Promise<number> {
  let stop = false;
  let opened = 0;
  const open = new Set<net.Socket>();
  const loop = async (): Promise<void> => {
    while (!stop) {
      const s = net.connect(port, '127.0.0.1');
      open.add(s);
      s.on('error', () => undefined);
      s.once('connect', () => (opened++, s.write(Buffer.from([0x16]))));
      await new Promise<void>((r) => s.once('close', () => r()));
      open.delete(s);
    }
  };
  const loops = Array.from({ length: 64 }, () => loop());
  await new Promise((r) => setTimeout(r, ms));
  stop = true;
  for (const s of open) s.destroy();
  await Promise.all(loops);
  return opened;
}

const rx = await listen('127.0.0.1', 0, { credentials: { kind: 'psk', identity: 'src', key: randomBytes(32) }, activate: async () => undefined });
void rx.next().catch(() => undefined);
const settle = async (): Promise<void> => {
  await new Promise((r) => setTimeout(r, 1000));
  gc();
};
await settle();
emit({ bench: 'flood-memory', round: 0, ...reading() });
for (let round = 1; round <= Number(values.rounds); round++) {
  const opened = await flood(rx.port, Number(values.seconds) * 1000);
  await settle();
  emit({ bench: 'flood-memory', round, connections: opened, ...reading() });
}
await rx.close();
emit({ bench: 'flood-memory', summary: true, machine: machine() });
