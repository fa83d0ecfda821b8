/**
 * The raw-TCP ceiling a benchmark compares livemig with, measured in the same run:
 * build/Release/raw_streams, a sending and a receiving thread per stream, 1 MiB sends; with
 * `region` true or 'mapped', from and into populated memory (each stream its slice); 'files', the
 * same memory as a memfd read and written through the file (livemig's own data path); else from
 * a buffer that stays in cache to a receiver that discards; `{ image }`, a disk image's data
 * extents read from one file and written into another at their offsets, made durable at the end
 * (one stream; `bytes` is the image's size).
 */
import { execFileSync, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { NetLink } from './netlink.js';

const RAW = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../build/Release/raw_streams');

/** One raw-TCP transfer of `bytes` over `streams` connections; the receiver across the link when there is one. */
export async function rawStreams(
  streams: number,
  bytes: number,
  link: NetLink | undefined,
  region: boolean | 'mapped' | 'files' | { image: { from: string; to: string } } = false,
): Promise<{ ms: number; sender_cpu_s: number; receiver_cpu_s: number }> {
  const host = link ? link.far : '127.0.0.1';
  const image = typeof region === 'object' ? region.image : undefined;
  const mode = image ? [`image:${image.to}`] : region === 'files' ? ['files'] : region ? ['region'] : [];
  const rx = spawn(link ? 'ip' : RAW, [...(link ? ['netns', 'exec', link.ns, RAW] : []), 'recv', host, '0', String(streams), String(bytes), ...mode], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines = createInterface({ input: rx.stdout! })[Symbol.asyncIterator]();
  const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
  let rxErr = '';
  rx.stderr!.on('data', (d: Buffer) => (rxErr += d.toString()));
  const rxDone = new Promise<void>((resolve) => rx.on('exit', () => resolve()));
  const out = execFileSync(RAW, ['send', host, String(port), String(streams), String(bytes), ...(image ? [`image:${image.from}`] : mode)]).toString();
  await rxDone;
  const sent = JSON.parse(out) as { ms: number; cpu_s: number };
  const received = JSON.parse(rxErr.trim().split('\n').pop()!) as { receiver_cpu_s: number };
  return { ms: sent.ms, sender_cpu_s: sent.cpu_s, receiver_cpu_s: received.receiver_cpu_s };
}
