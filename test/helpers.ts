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

/** A reference guest's heartbeat, as far as a check of its pages goes (src/workload/guest-process.ts). */
export interface GuestBeat {
  pid: number;
  seq: number;
  /** its write counter: it holds still while the guest checks its pages (writes wait) */
  writes: string;
  verify?: { bad: number };
}

/** a check's report rides on this many of the guest's next beats (VERIFY_REPEATS in the guest) */
const REPORT_BEATS = 3000;

/**
 * The check of every page a reference guest reports on its heartbeats (once it runs at a
 * destination, or when asked with SIGUSR2), waited for by its beats, not by the clock: however
 * long a loaded host takes, a guest that beats while its writes hold still is checking. A
 * report the test never got (datagrams drop when a busy observer falls behind) is asked for
 * again once the guest writes on and its report's beats have gone by. Only a guest silent for
 * `silentMs` (gone or stopped: a running one beats every millisecond) ends the wait in failure.
 */
export async function guestCheck<B extends GuestBeat>(o: {
  pid: number;
  /** every beat received so far, oldest first (a list that grows; other guests' beats are skipped) */
  beats: () => readonly B[];
  /** ask for a new check first: a report sent before does not count */
  ask?: boolean;
  silentMs?: number;
  maxAsks?: number;
}): Promise<NonNullable<B['verify']>> {
  const silentMs = o.silentMs ?? 60_000;
  const maxAsks = o.maxAsks ?? 5;
  const earlier = new Set<string>();
  let scanned = 0;
  let asks = 0;
  // since the start or the last ask: the first and the last beat, the writes while a check was
  // seen running, the seq of the first beat after it
  let first: GuestBeat | undefined;
  let last: GuestBeat | undefined;
  let held: bigint | undefined;
  let doneAt: number | undefined;
  let heard = performance.now();
  const ask = (): void => {
    for (const b of o.beats().slice(scanned)) if (b.pid === o.pid && b.verify) earlier.add(JSON.stringify(b.verify));
    scanned = o.beats().length;
    first = last = held = doneAt = undefined;
    asks++;
    process.kill(o.pid, 'SIGUSR2');
  };
  if (o.ask) ask();
  for (;;) {
    const list = o.beats();
    for (; scanned < list.length; scanned++) {
      const b = list[scanned]!;
      if (b.pid !== o.pid) continue;
      heard = performance.now();
      if (b.verify && !earlier.has(JSON.stringify(b.verify))) return b.verify;
      const writes = BigInt(b.writes);
      first ??= b;
      if (held === undefined && last && writes === BigInt(last.writes) && b.seq > last.seq) held = writes;
      else if (held !== undefined && doneAt === undefined && writes > held) doneAt = b.seq;
      last = b;
      // no report, and the beats it rode on have gone by: after a check seen to end, or (one too
      // short to show among the beats that arrived) while the guest wrote on all along
      const gone =
        doneAt !== undefined ? b.seq > doneAt + REPORT_BEATS : held === undefined && b.seq > first.seq + REPORT_BEATS && writes > BigInt(first.writes);
      if (gone) {
        if (asks >= maxAsks) throw new Error(`guest ${o.pid}: ${asks} checks asked for, and no report of one arrived`);
        ask();
        break;
      }
    }
    if (performance.now() - heard > silentMs) throw new Error(`guest ${o.pid}: no beat for ${silentMs} ms while waiting for its check (gone or stopped)`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Waits for what a test needs, however loaded the machine: `ready` reads state that events
 * change, and is asked every 20 ms; the bound only ends a test that would otherwise hang.
 */
export async function until(what: string, ready: () => boolean | Promise<boolean>, boundMs = 60_000): Promise<void> {
  for (const by = performance.now() + boundMs; !(await ready()); await new Promise((r) => setTimeout(r, 20))) {
    if (performance.now() > by) throw new Error(`${what}: not within ${boundMs} ms`);
  }
}

/** A TCP proxy to `port` that can drop every connection at once (and, `forGood`, refuse new ones; or send them to `afterCutTo`). */
export async function cuttableProxy(port: number, forGood = false, afterCutTo?: number): Promise<{ port: number; cut(): void; close(): void }> {
  const live = new Set<net.Socket>();
  let down = false;
  const server = net.createServer((c) => {
    if (down && forGood) return void c.destroy();
    // after the cut, `afterCutTo` (an impostor) answers in the destination's place
    const up = net.connect(down && afterCutTo !== undefined ? afterCutTo : port, '127.0.0.1');
    for (const x of [c, up]) {
      live.add(x);
      x.on('close', () => live.delete(x));
      x.on('error', () => undefined);
    }
    c.pipe(up);
    up.pipe(c);
  });
  server.listen(0, '127.0.0.1');
  await new Promise((r) => server.once('listening', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    cut: () => {
      down = true;
      for (const x of live) x.destroy();
    },
    close: () => server.close(),
  };
}
