/**
 * livemig's side of the reference guest: spawn it, receive its region, pause/resume/exit it,
 * start it again on the destination, and observe its heartbeats.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LivemigError } from '../errors.js';
import { addon } from '../native.js';
import { monotonicMs } from './clock.js';
import { GuestListener, type GuestConnection } from '../region/handover.js';
import type { Region } from '../region/region.js';
import type { RemoteTarget } from '../tracking/types.js';
import type { GuestState } from './state.js';

const GUEST_ENTRY = path.join(path.dirname(fileURLToPath(import.meta.url)), 'guest.js');

export interface GuestOptions {
  size: number;
  content: string;
  seed?: bigint;
  rate: number;
  pattern: string;
  hotSize?: number;
  heartbeat?: string;
  /** ms to wait for the guest to fill its region and hand it over */
  startTimeoutMs?: number;
}

let seq = 0;

export class SourceGuest {
  readonly child: ChildProcess;
  readonly conn: GuestConnection;
  #lines: AsyncIterator<string>;

  private constructor(child: ChildProcess, conn: GuestConnection) {
    this.child = child;
    this.conn = conn;
    this.#lines = createInterface({ input: conn.socket })[Symbol.asyncIterator]();
  }

  static async spawn(o: GuestOptions): Promise<SourceGuest> {
    const listener = GuestListener.listen(`@livemig-guest-${process.pid}-${seq++}`);
    const args = [GUEST_ENTRY, '--socket', listener.path, '--size', String(o.size), '--content', o.content, '--seed', String(o.seed ?? 1n), '--rate', String(o.rate), '--pattern', o.pattern];
    if (o.hotSize !== undefined) args.push('--hot-size', String(o.hotSize));
    if (o.heartbeat) args.push('--heartbeat', o.heartbeat);
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'] });
    const exited = once(child, 'exit').then(([code]) => {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest exited with code ${String(code)} before handing over its region`, { phase: 'handover' });
    });
    try {
      const conn = await Promise.race([listener.accept(o.startTimeoutMs ?? 120_000), exited]);
      return new SourceGuest(child, conn);
    } catch (e) {
      child.kill('SIGKILL');
      throw e;
    } finally {
      exited.catch(() => undefined);
      listener.close();
    }
  }

  get region(): Region {
    return this.conn.region;
  }
  get target(): RemoteTarget | undefined {
    return this.conn.hello.tracking === 'uffd-async' ? { pid: this.conn.pid, address: this.conn.address } : undefined;
  }

  async request(op: string, args: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    this.conn.socket.write(JSON.stringify({ op, ...args }) + '\n');
    const next = await this.#lines.next();
    if (next.done) throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest closed its control socket (asked to ${op})`, { phase: 'guest' });
    return JSON.parse(next.value) as Record<string, unknown>;
  }

  /** Pauses the guest; its state is the device state to carry. */
  async pause(): Promise<Buffer> {
    const r = await this.request('pause');
    if (r.op !== 'paused') throw new LivemigError('ERR_LIVEMIG_GUEST', `pause answered ${JSON.stringify(r)}`, { phase: 'stop-and-copy' });
    return Buffer.from(JSON.stringify(r.state));
  }
  async resume(): Promise<void> {
    const r = await this.request('resume');
    if (r.op !== 'resumed') throw new LivemigError('ERR_LIVEMIG_GUEST', `resume answered ${JSON.stringify(r)}`, { phase: 'resume' });
  }
  /** Slows the guest's writes to (100 - percent)% of its rate (auto-converge); 0 releases. */
  async throttle(percent: number): Promise<void> {
    const r = await this.request('throttle', { percent });
    if (r.op !== 'throttled') throw new LivemigError('ERR_LIVEMIG_GUEST', `throttle answered ${JSON.stringify(r)}`, { phase: 'precopy' });
  }
  async state(): Promise<GuestState> {
    return (await this.request('state')).state as GuestState;
  }
  /** Tells the guest to exit (after activation elsewhere) and releases livemig's mapping. */
  async exit(): Promise<void> {
    if (this.child.exitCode === null) {
      this.conn.socket.write(JSON.stringify({ op: 'exit' }) + '\n');
      await Promise.race([once(this.child, 'exit'), new Promise((r) => setTimeout(r, 2000))]);
      if (this.child.exitCode === null) this.child.kill('SIGKILL');
    }
    this.conn.socket.destroy();
    this.conn.region.release();
  }
  kill(): void {
    this.child.kill('SIGKILL');
    this.conn.socket.destroy();
    if (!this.conn.region.released) this.conn.region.release();
  }
}

/** Starts the reference guest on the destination from the migrated region and state. */
export function spawnDestinationGuest(region: Region, deviceState: Buffer): ChildProcess {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-state-'));
  const file = path.join(dir, 'state.json');
  writeFileSync(file, deviceState);
  const child = spawn(process.execPath, [GUEST_ENTRY, '--resume', '--state-file', file], { stdio: ['ignore', 'inherit', 'inherit', region.fd] });
  child.once('exit', () => rmSync(dir, { recursive: true, force: true }));
  return child;
}

interface GuestMessage {
  op?: string;
  uffd?: number;
  address?: string;
  registered?: { uffd: number; address: string };
}

/**
 * A destination guest started ahead of activation (like a hypervisor started with -incoming):
 * it holds the region's fd and is ready; activate() hands it the state and waits until it runs.
 */
export class IncomingGuest {
  readonly child: ChildProcess;
  readonly #ready: Promise<GuestMessage>;
  #postcopy = false;

  /** @param postcopy 'planned': register for post-copy at once, map nothing ahead; 'possible': map ahead, register on demand */
  constructor(region: Region, postcopy: 'planned' | 'possible' = 'possible') {
    this.child = spawn(process.execPath, [GUEST_ENTRY, '--incoming', '--size', String(region.size), '--postcopy', postcopy], { stdio: ['ignore', 'inherit', 'inherit', region.fd, 'ipc'] });
    this.#ready = this.#expect('ready');
    this.#ready.catch(() => undefined);
  }

  /**
   * Post-copy: the guest's mapping registered for minor faults; returns livemig's copy of the
   * guest's userfaultfd and the mapping's address in the guest.
   */
  async register(): Promise<{ uffd: number; address: bigint }> {
    const ready = await this.#ready;
    let reg = ready.registered;
    if (!reg) {
      const answer = this.#expect('registered');
      this.child.send({ op: 'register' });
      const m = await answer;
      reg = { uffd: m.uffd!, address: m.address! };
    }
    this.#postcopy = true;
    return { uffd: addon.takeFd(this.child.pid!, reg.uffd), address: BigInt(reg.address) };
  }

  #expect(op: string): Promise<GuestMessage> {
    return new Promise((resolve, reject) => {
      const onMessage = (m: GuestMessage): void => {
        if (m.op !== op) return;
        this.child.off('message', onMessage);
        this.child.off('exit', onExit);
        resolve(m);
      };
      const onExit = (code: number | null): void => {
        this.child.off('message', onMessage);
        reject(new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest exited (${String(code)}) before '${op}'`, { phase: 'activate' }));
      };
      this.child.on('message', onMessage);
      this.child.once('exit', onExit);
    });
  }

  /** Resolves once the guest has mapped the whole region and waits for its state. */
  get ready(): Promise<void> {
    return this.#ready.then(() => undefined);
  }

  async activate(deviceState: Buffer): Promise<void> {
    await this.#ready;
    const running = this.#expect('running');
    this.child.send({ state: JSON.parse(deviceState.toString('utf8')) as unknown });
    await running;
    if (this.#postcopy) return; // stays connected until verify()
    this.child.disconnect(); // the guest runs on its own now
    this.child.unref();
  }

  /** Post-copy: every page has arrived; the guest checks its whole region (result in a heartbeat). */
  async verify(): Promise<void> {
    const done = this.#expect('verified');
    this.child.send({ op: 'verify' });
    await done;
    this.child.disconnect();
    this.child.unref();
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }
}

export interface Beat {
  seq: number;
  writes: string;
  pid: number;
  /** when the guest sent it (its own clock stamp), monotonicMs() */
  at: number;
  verify?: { bad: number; firstBad: number; writes: string; ms: number };
}

/** Receives heartbeats (UDP) and measures the largest gap between consecutive ones. */
export class HeartbeatObserver {
  readonly beats: Beat[] = [];
  #socket = dgram.createSocket('udp4');
  #waiters: { pred: (b: Beat) => boolean; resolve: (b: Beat) => void }[] = [];
  address = '';

  static async start(host = '127.0.0.1'): Promise<HeartbeatObserver> {
    const o = new HeartbeatObserver();
    o.#socket.on('message', (msg) => {
      let b: Beat;
      try {
        const m = JSON.parse(msg.toString()) as Omit<Beat, 'at'> & { t?: number };
        // the guest's stamp, not our arrival time: a busy observer must not invent gaps
        b = { ...m, at: typeof m.t === 'number' ? m.t : monotonicMs() };
      } catch {
        return; // not a heartbeat: ignore stray datagrams
      }
      o.beats.push(b);
      o.#waiters = o.#waiters.filter((w) => (w.pred(b) ? (w.resolve(b), false) : true));
    });
    await new Promise<void>((resolve) => o.#socket.bind(0, host, () => resolve()));
    o.address = `${host}:${o.#socket.address().port}`;
    return o;
  }

  waitFor(pred: (b: Beat) => boolean, timeoutMs: number): Promise<Beat> {
    const found = this.beats.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new LivemigError('ERR_LIVEMIG_TIMEOUT', `no matching heartbeat within ${timeoutMs} ms`, { phase: 'observe' })), timeoutMs);
      this.#waiters.push({ pred, resolve: (b) => (clearTimeout(t), resolve(b)) });
    });
  }

  /**
   * Largest gap (ms) between consecutive heartbeats sent in [from, to] (monotonicMs()), counting
   * from the last one before `from`; source and destination guest beats are one sequence.
   */
  maxGap(from: number, to: number): number {
    let gap = 0;
    let prev: number | undefined;
    for (const b of [...this.beats].sort((x, y) => x.at - y.at)) {
      if (b.at > to) break;
      if (b.at < from) {
        prev = b.at;
        continue;
      }
      if (prev !== undefined) gap = Math.max(gap, b.at - prev);
      prev = b.at;
    }
    return gap;
  }

  close(): void {
    this.#socket.close();
  }
}
