/**
 * livemig's side of the reference guest: spawn it, receive its region, pause/resume/exit it,
 * start it again on the destination, and observe its heartbeats.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { once } from 'node:events';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LivemigError } from '../errors.js';
import { addon, call, closeFd } from '../native.js';
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
/** a guest's control thread answers in microseconds; this long means it is gone or stuck */
const CONTROL_TIMEOUT_MS = 2000;
/** a paused guest's lease runs this much past livemig's max pause (whose abort resumes it first) */
const LEASE_SLACK_MS = 1000;

export class SourceGuest {
  readonly child: ChildProcess;
  readonly conn: GuestConnection;
  #lines: AsyncIterator<string>;
  /** the state's fields a pause does not change, read once after the handover */
  #fixed: GuestState | undefined;

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
      const guest = new SourceGuest(child, conn);
      if (conn.controlFd >= 0) guest.#fixed = await guest.state();
      return guest;
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

  /**
   * Pauses the guest; its state is the device state to carry. With the fast control socket the
   * guest's control thread answers a byte with its run state {xorshift, writes, heartbeat seq}
   * while this thread waits (no event loop on either side of the pause).
   */
  async pause(lease?: { maxPauseMs: number }): Promise<Buffer> {
    if (this.#fixed) {
      // the guest resumes by itself if livemig stays silent this long before committing (a
      // stalled or dead source engine must not leave it paused); livemig's own max-pause
      // deadline comes first, so its resume is the one that normally happens
      const body = lease ? Buffer.alloc(4) : undefined;
      body?.writeUInt32LE(Math.min(0xffffffff, Math.ceil(lease!.maxPauseMs + LEASE_SLACK_MS)));
      const r = this.#control(0x50 /* P */, 0x70 /* p */, 'stop-and-copy', body);
      if (r.length !== 24) throw new LivemigError('ERR_LIVEMIG_GUEST', `pause answered ${r.length} bytes of run state, not 24`, { phase: 'stop-and-copy' });
      const run = new BigUint64Array(r.buffer.slice(r.byteOffset, r.byteOffset + 24));
      // the throttle is a migration's, not the guest's: wherever it resumes, it runs at full rate
      return Buffer.from(JSON.stringify({ ...this.#fixed, xs: run[0]!.toString(), writes: run[1]!.toString(), heartbeatSeq: Number(run[2]), throttle: 0 }));
    }
    const r = await this.request('pause');
    if (r.op !== 'paused') throw new LivemigError('ERR_LIVEMIG_GUEST', `pause answered ${JSON.stringify(r)}`, { phase: 'stop-and-copy' });
    return Buffer.from(JSON.stringify(r.state));
  }
  async resume(): Promise<void> {
    if (this.#fixed) {
      this.#control(0x52 /* R */, 0x72 /* r */, 'resume');
      return;
    }
    const r = await this.request('resume');
    if (r.op !== 'resumed') throw new LivemigError('ERR_LIVEMIG_GUEST', `resume answered ${JSON.stringify(r)}`, { phase: 'resume' });
  }
  /**
   * Right before the point of commitment: the guest must no longer resume by itself. It
   * refuses when its lease already ran out and it resumed (then there must be no commitment).
   */
  commit(): Promise<void> {
    if (!this.#fixed) return Promise.resolve();
    // 'C' goes now and its answer is read on the next turn of the loop: livemig asks for it as
    // soon as the device state is out, so that the guest's round trip runs beside the
    // destination's digest instead of after it, inside the pause
    try {
      addon.controlSend(this.conn.controlFd, 0x43 /* C */);
    } catch (e) {
      return Promise.reject(new LivemigError('ERR_LIVEMIG_GUEST', `the guest's control socket failed: ${(e as Error).message}`, { phase: 'commit', cause: e }));
    }
    return new Promise((resolve, reject) =>
      setImmediate(() => {
        try {
          this.#answer(0x43, 0x63 /* c */, 'commit', () => addon.controlReceive(this.conn.controlFd, CONTROL_TIMEOUT_MS));
          resolve();
        } catch (e) {
          reject(e);
        }
      }),
    );
  }
  #closeControl(): void {
    if (this.conn.controlFd < 0) return;
    closeFd(this.conn.controlFd, 'guest');
    this.conn.controlFd = -1;
  }

  #control(request: number, answer: number, phase: string, body?: Buffer): Buffer {
    return this.#answer(request, answer, phase, () => addon.controlRequest(this.conn.controlFd, request, CONTROL_TIMEOUT_MS, body));
  }

  #answer(request: number, answer: number, phase: string, exchange: () => { tag: number; body: Buffer }): Buffer {
    let r: { tag: number; body: Buffer };
    try {
      r = exchange();
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest's control socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
    if (r.tag !== answer) throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest answered '${String.fromCharCode(r.tag)}' to '${String.fromCharCode(request)}'${r.body.length ? `: ${r.body.toString('utf8', 0, 200)}` : ''}`, { phase });
    return r.body;
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
    this.#closeControl();
    this.conn.region.release();
  }
  /**
   * Lets the guest go on without us (a failed migration leaves it to the operator): our end of
   * its control socket closes, and this process may exit while it runs on.
   */
  detach(): void {
    this.conn.socket.destroy();
    this.#closeControl();
    this.child.unref();
  }

  kill(): void {
    this.child.kill('SIGKILL');
    this.conn.socket.destroy();
    this.#closeControl();
    if (!this.conn.region.released) this.conn.region.release();
  }
}

interface GuestMessage {
  op?: string;
  message?: string;
  uffd?: number;
  address?: string;
  registered?: { uffd: number; address: string };
}

/**
 * A destination guest started ahead of activation (like a hypervisor started with -incoming):
 * it holds the region's fd, maps it, and then waits on its go socket: prepare() hands it the
 * state before the source commits, activate() starts it with one byte and waits until it runs.
 */
export class IncomingGuest {
  readonly child: ChildProcess;
  readonly #ready: Promise<GuestMessage>;
  #postcopy = false;
  /** livemig's end of the go socket; the guest blocks on its end once prepared */
  #goFd: number;
  #prepared: Promise<void> | undefined;
  #stateSent = false;

  /** @param postcopy 'planned': register for post-copy at once, map nothing ahead; 'possible': map ahead, register on demand */
  constructor(region: Region, postcopy: 'planned' | 'possible' = 'possible') {
    const [mine, theirs] = call('ERR_LIVEMIG_GUEST', 'reserve', 'making the go socket pair', () => addon.socketPair());
    try {
      this.child = spawn(process.execPath, [GUEST_ENTRY, '--incoming', '--size', String(region.size), '--postcopy', postcopy, '--go-fd', '5'], {
        stdio: ['ignore', 'inherit', 'inherit', region.fd, 'ipc', theirs],
      });
    } catch (e) {
      closeFd(mine, 'guest');
      throw e;
    } finally {
      closeFd(theirs, 'guest');
    }
    this.#goFd = mine;
    this.child.once('exit', () => this.#closeGo());
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
      await this.#prepared; // its answer comes first on the go socket
      const body = this.#command(0x55 /* U */, 0x75 /* u */, 'postcopy');
      if (body.length !== 12) throw new LivemigError('ERR_LIVEMIG_GUEST', `register answered ${body.length} bytes, not 12`, { phase: 'postcopy' });
      reg = { uffd: body.readUInt32LE(0), address: body.readBigUInt64LE(4).toString() };
    }
    this.#postcopy = true;
    const pid = this.child.pid!;
    return { uffd: call('ERR_LIVEMIG_GUEST', 'postcopy', "taking the guest's userfaultfd", () => addon.takeFd(pid, reg.uffd)), address: BigInt(reg.address) };
  }

  #expect(op: string): Promise<GuestMessage> {
    return new Promise((resolve, reject) => {
      const onMessage = (m: GuestMessage): void => {
        if (m.op !== op && m.op !== 'error') return;
        this.child.off('message', onMessage);
        this.child.off('exit', onExit);
        if (m.op === 'error') reject(new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest refused (waiting for '${op}'): ${String(m.message)}`, { phase: 'activate' }));
        else resolve(m);
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

  /**
   * Hands the guest its state ahead of activation: it checks and loads it, then waits on its
   * go socket. Called when the device state arrives, before the source commits, so a state the
   * guest refuses fails the migration while the source can still resume its guest. The state
   * goes at once; the answer is read when the caller next waits, so the guest checks the state
   * while the caller goes on (the receiver computes its digest meanwhile).
   */
  prepare(deviceState: Buffer): Promise<void> {
    this.#prepared ??= this.#ready.then(() => undefined);
    if (this.#goFd >= 0 && !this.#stateSent) {
      this.#stateSent = true;
      try {
        addon.controlSend(this.#goFd, 0x53 /* S */, deviceState);
      } catch (e) {
        this.#prepared = Promise.reject(new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest's go socket failed: ${(e as Error).message}`, { phase: 'activate', cause: e }));
        return this.#prepared;
      }
      this.#prepared = this.#prepared.then(() => void this.#answer(0x53 /* S */, 0x73 /* s */, 'activate'));
    }
    return this.#prepared;
  }

  /** Starts the guest: one byte on the go socket, answered by the guest itself (prepares first if need be). */
  async activate(deviceState: Buffer): Promise<void> {
    await this.prepare(deviceState);
    this.#command(0x47 /* G */, 0x67 /* g */, 'activate');
    this.#closeGo();
    if (this.#postcopy) return; // stays connected until verify()
    // the guest runs on its own now; letting go of it is not part of the hand-over
    setImmediate(() => {
      if (this.child.connected) this.child.disconnect();
      this.child.unref();
    });
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
    this.#closeGo();
  }

  #closeGo(): void {
    if (this.#goFd < 0) return;
    closeFd(this.#goFd, 'guest');
    this.#goFd = -1;
  }

  #command(request: number, answer: number, phase: string): Buffer {
    if (this.#goFd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the incoming guest is gone', { phase });
    try {
      addon.controlSend(this.#goFd, request);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest's go socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
    return this.#answer(request, answer, phase);
  }

  #answer(request: number, answer: number, phase: string): Buffer {
    if (this.#goFd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the incoming guest is gone', { phase });
    let r: { tag: number; body: Buffer };
    try {
      r = addon.controlReceive(this.#goFd, CONTROL_TIMEOUT_MS);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest's go socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
    if (r.tag === 0x65 /* e */) throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest refused '${String.fromCharCode(request)}': ${r.body.toString('utf8')}`, { phase });
    if (r.tag !== answer) throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest answered '${String.fromCharCode(r.tag)}' to '${String.fromCharCode(request)}'`, { phase });
    return r.body;
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
