/**
 * livemig's side of the reference guest: start it, take its region (the guest contract,
 * src/guest/), pause/resume/release it, start it again on the destination, and observe its
 * heartbeats.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import dgram from 'node:dgram';
import { once } from 'node:events';
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { LivemigError } from '../errors.js';
import type { HugePages } from '../region/huge-pages.js';
import { SourceGuestSession } from '../guest/source-session.js';
import { IncomingGuest, NAME_PLACEHOLDER, REGISTER_PLACEHOLDER, SOCKET_PLACEHOLDER } from '../guest/incoming-session.js';
import type { GuestLayout } from '../guest/layout.js';
import { PAGE_SIZE, type Region } from '../region/region.js';
import { parseGuestState, type GuestState } from './state.js';
import { monotonicMs } from './clock.js';

const GUEST_ENTRY = path.join(path.dirname(fileURLToPath(import.meta.url)), 'guest.js');
const C_GUEST = fileURLToPath(new URL('../../../build/Release/c_guest', import.meta.url));

export interface GuestOptions {
  size: number;
  content: string;
  seed?: bigint;
  rate: number;
  pattern: string;
  hotSize?: number;
  heartbeat?: string;
  /** ms between the guest's ticks and beats (default 1): more where nobody measures its gaps, to spare the CPU */
  beatMs?: number;
  /** no write tracking: livemig falls back to hashing */
  noTrack?: boolean;
  /** the backing of its memory (default none: 4 KiB shmem) */
  hugePages?: HugePages;
  /** ms to wait for the guest to fill its region and say hello */
  startTimeoutMs?: number;
  /** a disk (native/guest/example/example_disk.h): its image created at `path` */
  diskImage?: GuestDiskOptions;
}

/** The example guests' disk: an image at `path` of `size` bytes, written at `rate` MB/s of random 4 KiB blocks. */
export interface GuestDiskOptions {
  path: string;
  size: number;
  rate: number;
  /** the guest reports no writes: livemig finds them itself (reflink, or hashing) */
  noTrack?: boolean;
}

function diskArgs(d: GuestDiskOptions | undefined): string[] {
  if (!d) return [];
  return ['--disk', d.path, '--disk-size', String(d.size), '--disk-rate', String(d.rate), ...(d.noTrack ? ['--no-disk-track'] : [])];
}

/** The reference guest's command line, serving at `socket` (source mode). */
export function referenceGuestArgs(socket: string, o: GuestOptions): string[] {
  const args = [
    GUEST_ENTRY,
    '--socket',
    socket,
    '--size',
    String(o.size),
    '--content',
    o.content,
    '--seed',
    String(o.seed ?? 1n),
    '--rate',
    String(o.rate),
    '--pattern',
    o.pattern,
  ];
  if (o.hotSize !== undefined) args.push('--hot-size', String(o.hotSize));
  if (o.heartbeat) args.push('--heartbeat', o.heartbeat);
  if (o.beatMs !== undefined) args.push('--beat-ms', String(o.beatMs));
  if (o.noTrack) args.push('--no-track');
  if (o.hugePages && o.hugePages !== 'none') args.push('--huge-pages', o.hugePages);
  args.push(...diskArgs(o.diskImage));
  return [process.execPath, ...args];
}

/** A reference guest that registers with a `livemig serve` daemon's guest socket, listed there as `name`. */
export function referenceGuestRegisterArgs(daemonGuests: string, name: string, o: GuestOptions): string[] {
  const args = referenceGuestArgs(daemonGuests, o);
  const at = args.indexOf('--socket');
  args.splice(at, 2, '--register', daemonGuests, '--name', name);
  return args;
}

/**
 * The reference guest started for a migration's destination (`{socket}`: where it serves);
 * a daemon's (`register`) registers with it once it runs, to be migrated again.
 */
export function referenceIncomingCommand(o: { register?: boolean } = {}): string[] {
  const again = o.register ? ['--register', REGISTER_PLACEHOLDER, '--name', NAME_PLACEHOLDER] : [];
  return [process.execPath, GUEST_ENTRY, '--incoming', '--socket', SOCKET_PLACEHOLDER, ...again];
}

/** A reference guest started for a migration's destination, handed `region` (as a receiver's onReserved does). */
export function startReferenceIncoming(
  region: Region,
  layout: GuestLayout,
  postcopy: 'planned' | 'possible' | 'no' = 'possible',
  disks?: readonly { name: string; size: number; fd: number }[],
): Promise<IncomingGuest> {
  const files = layout.regions.map((r) => ({ fd: region.fd, offset: r.firstPage * PAGE_SIZE }));
  return IncomingGuest.start({
    command: referenceIncomingCommand(),
    layout,
    files,
    populate: postcopy !== 'planned',
    registerEarly: postcopy === 'planned',
    ...(disks ? { disks } : {}),
  });
}

/** The C example guest (native/guest/example/c_guest.c), built by npm install. */
export const cGuestPath = C_GUEST;
export function cGuestArgs(
  socket: string,
  o: {
    sizes?: string;
    rate: number;
    seed?: bigint;
    heartbeat?: string;
    noTrack?: boolean;
    sparse?: boolean;
    hugePages?: HugePages;
    diskImage?: GuestDiskOptions;
  },
): string[] {
  const args = [C_GUEST, '--listen', socket, '--sizes', o.sizes ?? '192M,64M', '--rate', String(o.rate), '--seed', String(o.seed ?? 1n)];
  if (o.heartbeat) args.push('--heartbeat', o.heartbeat);
  if (o.noTrack) args.push('--no-track');
  if (o.sparse) args.push('--sparse');
  if (o.hugePages && o.hugePages !== 'none') args.push('--huge-pages', o.hugePages);
  args.push(...diskArgs(o.diskImage));
  return args;
}
export function cIncomingCommand(o: { register?: boolean; diskAsk?: boolean } = {}): string[] {
  return [
    C_GUEST,
    '--incoming',
    SOCKET_PLACEHOLDER,
    ...(o.register ? ['--register', REGISTER_PLACEHOLDER, '--name', NAME_PLACEHOLDER] : []),
    ...(o.diskAsk ? ['--disk-ask'] : []),
  ];
}

/**
 * A guest process started here, which livemig then migrates: the reference guest (default) or
 * any command that follows the guest contract and serves at the socket path it is given.
 */
export class SourceGuest {
  readonly child: ChildProcess;
  readonly session: SourceGuestSession;
  readonly #dir: string;

  private constructor(child: ChildProcess, session: SourceGuestSession, dir: string) {
    this.child = child;
    this.session = session;
    this.#dir = dir;
  }

  static async spawn(o: GuestOptions): Promise<SourceGuest> {
    return SourceGuest.start((socket) => referenceGuestArgs(socket, o), o.startTimeoutMs);
  }

  /** Starts `argv(socket)` and connects to it once it serves there. */
  static async start(argv: (socket: string) => string[], startTimeoutMs = 120_000): Promise<SourceGuest> {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-guest-'));
    const socket = path.join(dir, 'guest.sock');
    const [cmd, ...args] = argv(socket);
    // The guest writes its diagnostics to guest.log beside its socket, not to our stderr: a
    // guest outlives a livemig that failed (it keeps running here), and holding the caller's
    // stderr open kept `out=$(livemig send …)` waiting for the guest to end. A file, not a pipe
    // we forward: a guest writing to a pipe whose reader is gone would die of SIGPIPE.
    const log = openSync(path.join(dir, 'guest.log'), 'a', 0o600);
    const child = spawn(cmd!, args, { stdio: ['ignore', 'ignore', log] });
    closeSync(log);
    try {
      const session = await SourceGuestSession.connect(socket, { timeoutMs: startTimeoutMs, child });
      return new SourceGuest(child, session, dir);
    } catch (e) {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  }

  get region() {
    return this.session.region;
  }
  get layout() {
    return this.session.layout;
  }
  get target() {
    return this.session.target;
  }
  get memory() {
    return this.session.memory;
  }

  async pause(lease?: { maxPauseMs: number }): Promise<Buffer> {
    return this.session.pause(lease);
  }
  commit(): Promise<void> {
    return this.session.commit();
  }
  async resume(): Promise<void> {
    this.session.resume();
  }
  async throttle(percent: number): Promise<void> {
    this.session.throttle(percent);
  }
  /** The reference guest's state, read with a pause of an instant (the contract has no other query): for tests and diagnostics. */
  async state(): Promise<GuestState> {
    const s = parseGuestState(this.session.pause());
    this.session.resume();
    return s;
  }
  /** The guest runs elsewhere now: it stops; livemig's mapping goes. */
  async exit(): Promise<void> {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = once(this.child, 'exit');
      try {
        this.session.release();
      } finally {
        await Promise.race([exited, new Promise((r) => setTimeout(r, 2000))]);
        if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
      }
    }
    this.session.close();
    rmSync(this.#dir, { recursive: true, force: true });
  }
  /**
   * Lets the guest go on without us (a failed migration leaves it to the operator): our end of
   * its socket closes, and this process may exit while it runs on.
   */
  detach(): void {
    this.session.close();
    this.child.unref();
  }
  kill(): void {
    this.child.kill('SIGKILL');
    this.session.close();
    rmSync(this.#dir, { recursive: true, force: true });
  }
}

export interface Beat {
  seq: number;
  writes: string;
  pid: number;
  /** when the guest sent it (its own clock stamp), monotonicMs() */
  at: number;
  verify?: { bad: number; firstBad: number; writes: string; ms: number; disk?: { bad: number; firstBad: number; writes: string; blocks: number } };
}

/** Receives heartbeats (UDP) and measures the largest gap between consecutive ones. */
export class HeartbeatObserver {
  readonly beats: Beat[] = [];
  // a large buffer: many guests beat into one observer at 1 kHz each
  #socket = dgram.createSocket({ type: 'udp4', recvBufferSize: 8 << 20 });
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
      const t = setTimeout(
        () => reject(new LivemigError('ERR_LIVEMIG_TIMEOUT', `no matching heartbeat within ${timeoutMs} ms`, { phase: 'observe' })),
        timeoutMs,
      );
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

  /** The gap between the last beat at or before `t` and the first one after it (any guest's): what a pause at `t` felt like. */
  gapAcross(t: number): number | undefined {
    let before: number | undefined;
    let after: number | undefined;
    for (const b of this.beats) {
      if (b.at <= t) before = before === undefined ? b.at : Math.max(before, b.at);
      else after = after === undefined ? b.at : Math.min(after, b.at);
    }
    return before !== undefined && after !== undefined ? after - before : undefined;
  }

  close(): void {
    this.#socket.close();
  }
}
