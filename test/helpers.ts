import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import net from 'node:net';
import { addon } from '../src/native.js';
import { Region } from '../src/region/region.js';

export const GiB = 1 << 30;
export const here = path.dirname(fileURLToPath(import.meta.url));
export const fixture = (name: string): string => path.join(here, 'fixtures', name);

let socketSeq = 0;
export function abstractSocket(tag: string): string {
  return `@livemig-test-${process.pid}-${tag}-${socketSeq++}`;
}

/** Fails with the first few missing and extra pages when `got` is not exactly `want`. */
export function assertSamePages(got: Uint32Array, want: Uint32Array | readonly number[], label: string): void {
  const wantSet = new Set<number>(want as ArrayLike<number> as number[]);
  const gotSet = new Set<number>(got);
  const missing = [...wantSet].filter((p) => !gotSet.has(p));
  const extra = [...gotSet].filter((p) => !wantSet.has(p));
  assert.equal(gotSet.size, got.length, `${label}: a page was reported twice`);
  assert.deepEqual(
    { missing: missing.length, extra: extra.length },
    { missing: 0, extra: 0 },
    `${label}: missing [${missing.slice(0, 8).join(',')}] extra [${extra.slice(0, 8).join(',')}]`,
  );
  for (let i = 1; i < got.length; i++) assert.ok(got[i]! > got[i - 1]!, `${label}: pages are not ascending`);
}

/** A writer on a worker thread attached to the same mapping. */
export class WorkerWriter {
  readonly worker: Worker;
  private constructor(worker: Worker) {
    this.worker = worker;
  }
  static async start(shareId: bigint): Promise<WorkerWriter> {
    const worker = new Worker(fixture('writer-worker.js'), { workerData: { shareId } });
    const [m] = (await once(worker, 'message')) as [{ op: string }];
    assert.equal(m.op, 'ready');
    return new WorkerWriter(worker);
  }
  async request<T>(message: object): Promise<T> {
    this.worker.postMessage(message);
    const [m] = (await once(this.worker, 'message')) as [T];
    return m;
  }
  async write(pages: Uint32Array, round: number): Promise<void> {
    await this.request({ op: 'write', pages, round });
  }
  async close(): Promise<void> {
    this.worker.postMessage({ op: 'exit' });
    await once(this.worker, 'exit');
  }
}

/** The child-process guest from fixtures/guest-child.ts (two regions), driven over its IPC channel. */
export class ChildGuest {
  constructor(readonly child: ChildProcess) {}

  static spawn(socketPath: string, size: number, tracking: 'uffd-async' | 'none'): ChildProcess {
    return spawn(process.execPath, [fixture('guest-child.js'), socketPath, String(size), tracking], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  }
  async write(pages: Uint32Array, round: number): Promise<void> {
    const done = once(this.child, 'message');
    this.child.send({ op: 'write', pages: Array.from(pages), round });
    assert.equal(((await done)[0] as { op: string }).op, 'done');
  }
  async close(): Promise<void> {
    this.child.send({ op: 'exit' });
    if (this.child.exitCode === null) await once(this.child, 'exit');
  }
}

/** A connected loopback TCP pair; the accepting side is paused (a native wire may take it over). */
export async function tcpPair(): Promise<{ client: net.Socket; peer: net.Socket; server: net.Server }> {
  const server = net.createServer({ pauseOnConnect: true });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'connect');
  const [peer] = (await accepted) as [net.Socket];
  return { client, peer, server };
}

/** The digest of a region's pages as they are now (what the commitment digest would be over them). */
export async function imageDigest(region: Region): Promise<bigint> {
  const table = new BigUint64Array(region.pageCount);
  await addon.hashAll(region.nativeHandle, table);
  return addon.digestTable(table);
}

/** Why post-copy cannot run here (userfaultfd minor faults on shared memory), or undefined. */
export function minorFaultsReason(): string | undefined {
  const probe = Region.create(1 << 20, { name: 'livemig-probe' });
  try {
    addon.closeFd(addon.uffdRegisterMinor(probe.address, probe.size));
    return undefined;
  } catch (e) {
    return `userfaultfd minor faults on shared memory are not available: ${(e as Error).message}`;
  } finally {
    probe.release();
  }
}
