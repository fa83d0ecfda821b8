/**
 * bench/faults: what hostile clients cost a migration (issue 18, point 7; issue 29, points 2,
 * 3 and 6). Each case alternates an undisturbed migration with a disturbed one (undisturbed,
 * crowded, ...) so that a drifting host drifts for both, and prints one JSON line per run and
 * a summary per case: downtime and total time, median and range, and the ratio crowded /
 * undisturbed. Target: both within 10% (ratio <= 1.10).
 *
 *   idle                  the default demo (1 GiB `mixed`, 64 MiB/s), plain TCP, crowded by
 *                         200 idle connections spread over 13 loopback addresses (127.0.0.2-14)
 *                         as from many hosts, opened before the guest starts (with --redial S,
 *                         each one the receiver lets go is opened again S seconds later), and
 *                         one client from 127.0.0.15 sending a HELLO one byte a second.
 *   crowd-same-address    the same demo with mutual TLS on both sides (runDemo's `secure`: the
 *                         receiver has a handshake to wait on), crowded by 64 loops from
 *                         127.0.0.1, the sender's own address, each connecting, sending 0x16 and
 *                         connecting again once the receiver lets it go (bench/faults-crowd.ts,
 *                         a process of its own).
 *   silent-authenticated  `livemig send --rate 0` to `livemig receive` (UV_THREADPOOL_SIZE=4, a
 *                         receiver's default pool), both with a fresh PSK, crowded by 8
 *                         connections that complete the TLS handshake with that key and then send
 *                         nothing, opened again when the receiver lets them go. runDemo makes a
 *                         CA of its own per run and gives no third party a certificate, hence
 *                         the commands.
 *
 * The two new cases also read the receiver's memory (VmRSS, and RssAnon: the region it maps is
 * shared memory) and descriptors from /proc. `livemig receive` exits with its migration, so the
 * "after" reading cannot follow the migration: once the receiver listens, the crowd runs alone
 * for --soak seconds and stops, and the receiver is read 3 s later and again after a forced
 * full GC (bench/faults-gc.ts, preloaded through NODE_OPTIONS); then the crowd comes back for
 * the migration. The undisturbed run goes through the same steps without a crowd.
 *   node dist/bench/faults.js [--case idle|crowd-same-address|silent-authenticated|all]
 *     [--size 1GiB] [--runs 5] [--idle 200] [--redial SECONDS] [--soak 3]
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { parseNumber, parseSize } from '../src/cli/units.js';
import { runDemo, type DemoReport } from '../src/demo/demo.js';
import { encodeHello } from '../src/protocol/messages.js';
import type { FramedConnection } from '../src/protocol/connection.js';
import type { MigrationReport } from '../src/source/types.js';
import { secureConnect, type Credentials } from '../src/security/tls.js';
import { emit, machine, median } from './common.js';

const CASES = ['idle', 'crowd-same-address', 'silent-authenticated'] as const;
type CaseName = (typeof CASES)[number];

const { values } = parseArgs({
  options: {
    case: { type: 'string', default: 'all' },
    size: { type: 'string', default: String(1 << 30) },
    runs: { type: 'string', default: '5' },
    idle: { type: 'string', default: '200' },
    redial: { type: 'string' },
    soak: { type: 'string', default: '3' },
  },
});
if (values.case !== 'all' && !(CASES as readonly string[]).includes(values.case)) {
  process.stderr.write(`--case must be one of ${CASES.join(', ')} or all, got '${values.case}'\n`);
  process.exit(2);
}
const cases: readonly CaseName[] = values.case === 'all' ? CASES : [values.case as CaseName];
const redialMs = values.redial !== undefined ? parseNumber(values.redial, '--redial (seconds)') * 1000 : undefined;
const size = parseSize(values.size, '--size');
const runs = parseNumber(values.runs, '--runs', 1);
const idleCount = parseNumber(values.idle, '--idle');
const soakMs = parseNumber(values.soak, '--soak (seconds)') * 1000;
/** how long after the crowd stopped the receiver is read before the forced GC (issue 29 saw RSS still up after 3 s) */
const SETTLE_MS = 3_000;
const SAME_ADDRESS_LOOPS = 64;
const SILENT_PEERS = 8;
const CLI_ENTRY = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// One private directory for the PSK and the GC acknowledgements, gone with the bench.
const work = mkdtempSync(path.join(os.tmpdir(), 'livemig-bench-faults-'));
process.on('exit', () => rmSync(work, { recursive: true, force: true }));
// Every receiver this bench starts, through runDemo or itself, inherits the preload.
process.env['LIVEMIG_BENCH_GC_DIR'] = work;
process.env['NODE_OPTIONS'] = `${process.env['NODE_OPTIONS'] ?? ''} --import=${new URL('./faults-gc.js', import.meta.url).href}`.trim();

// ---- the receiver as /proc sees it ----

/** What a receiver holds now; undefined once it has exited. */
interface Held {
  rss_mib: number;
  anon_mib: number;
  fds: number;
}

function held(pid: number): Held | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kib = (key: string): number | undefined => {
      const m = new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status);
      return m ? Number(m[1]) : undefined;
    };
    const rss = kib('VmRSS');
    if (rss === undefined) return undefined; // a zombie: exited, not reaped yet
    return { rss_mib: +(rss / 1024).toFixed(1), anon_mib: +((kib('RssAnon') ?? 0) / 1024).toFixed(1), fds: readdirSync(`/proc/${pid}/fd`).length };
  } catch {
    return undefined;
  }
}

/** The highest of each reading, sampled every 100 ms until stop(). */
class PeakHeld {
  #max: Held | undefined;
  readonly #timer: NodeJS.Timeout;

  constructor(readonly pid: number) {
    this.#take();
    this.#timer = setInterval(() => this.#take(), 100);
  }

  #take(): void {
    const h = held(this.pid);
    if (!h) return;
    const m = this.#max;
    this.#max = m ? { rss_mib: Math.max(m.rss_mib, h.rss_mib), anon_mib: Math.max(m.anon_mib, h.anon_mib), fds: Math.max(m.fds, h.fds) } : h;
  }

  stop(): Held | null {
    clearInterval(this.#timer);
    this.#take();
    return this.#max ?? null;
  }
}

/** The process holding the socket that listens on `port` (runDemo does not say which its receiver is). */
function listenerPid(port: number): number {
  const inodes = new Set<string>();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text: string;
    try {
      text = readFileSync(table, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const c = line.trim().split(/\s+/);
      if (c.length > 9 && c[3] === '0A' && parseInt(c[1]!.split(':')[1]!, 16) === port) inodes.add(c[9]!);
    }
  }
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      for (const fd of readdirSync(`/proc/${pid}/fd`)) {
        const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
        if (m && inodes.has(m[1]!)) return Number(pid);
      }
    } catch {
      // not ours to read, or gone
    }
  }
  return 0;
}

/** The JavaScript heap a forced GC left (bench/faults-gc.ts): what is held outside it is the rest of RssAnon. */
interface HeapAfterGc {
  heap_used_mib: number;
  heap_total_mib: number;
  external_mib: number;
}

/** Asks the receiver's preload (bench/faults-gc.ts) for a full GC; undefined when it did not answer within 3 s. */
async function forceGc(pid: number): Promise<HeapAfterGc | undefined> {
  const file = path.join(work, String(pid));
  const ack = (): (HeapAfterGc & { done: number }) | undefined => {
    try {
      return JSON.parse(readFileSync(file, 'utf8')) as HeapAfterGc & { done: number };
    } catch {
      return undefined; // none yet, or caught half-written
    }
  };
  const before = ack()?.done ?? 0;
  try {
    process.kill(pid, 'SIGURG');
  } catch {
    return undefined;
  }
  for (let i = 0; i < 150; i++) {
    await sleep(20);
    const a = ack();
    if (a && a.done > before) {
      await sleep(200); // V8 hands freed pages back to the kernel as it sweeps, a little after
      return { heap_used_mib: a.heap_used_mib, heap_total_mib: a.heap_total_mib, external_mib: a.external_mib };
    }
  }
  return undefined;
}

/** The receiver's readings over one run (see the header: the "after" ones come before the migration). */
interface Readings {
  /** listening, after a forced GC, before any crowd */
  before: Held | null;
  /** peak while the crowd ran alone for --soak seconds */
  crowd_alone_peak: Held | null;
  /** 3 s after that crowd stopped, no GC */
  after_3s: Held | null;
  /** then after a forced GC, and the JavaScript heap that GC left */
  after_gc: Held | null;
  after_gc_heap: HeapAfterGc | null;
  /** peak from the crowd's return to the receiver's exit */
  migration_peak: Held | null;
  gc_forced: boolean;
}

// ---- what disturbs a migration ----

interface Disturbance {
  /** resolves once the crowd is in place */
  start(port: number): Promise<void>;
  stop(): Promise<Record<string, number>>;
}

/** The idle case's crowd: `idle` connections that never send a byte, and one that sends a byte a second. */
class IdleCrowd implements Disturbance {
  readonly #sockets = new Set<net.Socket>();
  readonly #timers = new Set<NodeJS.Timeout>();
  #stopped = false;
  #port = 0;
  #opened = 0;
  #closedByReceiver = 0;
  #slowBytes = 0;

  constructor(readonly idle: number) {}

  async start(port: number): Promise<void> {
    this.#port = port;
    for (let i = 0; i < this.idle; i++) this.#idle(i);
    this.#slow();
    await sleep(500);
  }

  #track(s: net.Socket, reopenAfterMs: number | undefined, reopen: () => void): void {
    this.#opened++;
    this.#sockets.add(s);
    s.on('error', () => undefined);
    s.resume();
    s.on('close', () => {
      this.#sockets.delete(s);
      if (this.#stopped) return;
      this.#closedByReceiver++;
      if (reopenAfterMs === undefined) return;
      const t = setTimeout(() => (this.#timers.delete(t), reopen()), reopenAfterMs);
      this.#timers.add(t);
    });
  }

  #idle(i: number): void {
    this.#track(net.connect({ port: this.#port, host: '127.0.0.1', localAddress: `127.0.0.${2 + (i % 13)}` }), redialMs, () => this.#idle(i));
  }

  #slow(): void {
    const s = net.connect({ port: this.#port, host: '127.0.0.1', localAddress: '127.0.0.15' });
    const hello = encodeHello({ versions: [1, 3], regionBytes: 4096, pageSize: 4096, auth: null, capabilities: [] });
    let at = 0;
    const drip = setInterval(() => {
      if (at < hello.length && !s.destroyed) {
        s.write(hello.subarray(at, ++at));
        this.#slowBytes++;
      }
    }, 1000);
    this.#timers.add(drip);
    s.on('close', () => (clearInterval(drip), this.#timers.delete(drip)));
    this.#track(s, 20, () => this.#slow());
  }

  async stop(): Promise<Record<string, number>> {
    this.#stopped = true;
    const openAtEnd = this.#sockets.size;
    for (const t of this.#timers) clearTimeout(t);
    for (const s of this.#sockets) s.destroy();
    return { idle: this.idle, opened: this.#opened, closed_by_receiver: this.#closedByReceiver, open_at_end: openAtEnd, slow_bytes: this.#slowBytes };
  }
}

/** 64 loops from the sender's own address, in a process of their own (bench/faults-crowd.ts). */
class SameAddressCrowd implements Disturbance {
  #child: ChildProcess | undefined;

  async start(port: number): Promise<void> {
    const script = fileURLToPath(new URL('./faults-crowd.js', import.meta.url));
    const child = fork(script, [String(port), String(SAME_ADDRESS_LOOPS)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.#child = child;
    await new Promise<void>((resolve, reject) => {
      child.once('message', () => resolve());
      child.once('exit', (code) => reject(new Error(`the crowd's process exited before it was in place (${code})`)));
    });
  }

  async stop(): Promise<Record<string, number>> {
    const child = this.#child;
    if (!child || child.exitCode !== null) return {};
    const stats = new Promise<Record<string, number>>((resolve) => {
      child.on('message', (m: { stats?: Record<string, number> }) => m.stats && resolve(m.stats));
      child.once('exit', () => resolve({}));
    });
    child.send('stop');
    const timeout = setTimeout(() => child.kill('SIGKILL'), 3_000);
    const s = await stats;
    if (child.exitCode === null) await once(child, 'exit');
    clearTimeout(timeout);
    return s;
  }
}

/** Connections that complete the TLS handshake with the receiver's key and then say nothing. */
class SilentPeers implements Disturbance {
  readonly #conns = new Set<FramedConnection>();
  readonly #connecting = new Set<net.Socket>();
  readonly #timers = new Set<NodeJS.Timeout>();
  #stopped = false;
  #port = 0;
  #opened = 0;
  #proven = 0;
  #closedByReceiver = 0;
  #failed = 0;

  constructor(
    readonly count: number,
    readonly credentials: Credentials,
  ) {}

  async start(port: number): Promise<void> {
    this.#port = port;
    await Promise.all(Array.from({ length: this.count }, () => this.#open()));
  }

  async #open(): Promise<void> {
    if (this.#stopped) return;
    this.#opened++;
    const raw = net.connect({ port: this.#port, host: '127.0.0.1' });
    this.#connecting.add(raw);
    let conn: FramedConnection;
    try {
      await new Promise<void>((resolve, reject) => (raw.once('connect', resolve), raw.once('error', reject)));
      conn = (await secureConnect(raw, this.credentials)).conn;
    } catch {
      raw.destroy();
      this.#connecting.delete(raw);
      if (this.#stopped) return;
      this.#failed++;
      const t = setTimeout(() => (this.#timers.delete(t), void this.#open()), 200);
      this.#timers.add(t);
      return;
    }
    this.#connecting.delete(raw);
    if (this.#stopped) return conn.close();
    this.#proven++;
    this.#conns.add(conn);
    // secureConnect hands the descriptor to a native Wire: a read would hold one of this
    // process's pool threads per peer; peerGone() peeks without waiting
    const poll = setInterval(() => {
      if (!conn.peerGone()) return;
      clearInterval(poll);
      this.#timers.delete(poll);
      this.#conns.delete(conn);
      conn.close();
      if (this.#stopped) return;
      this.#closedByReceiver++;
      void this.#open();
    }, 100);
    this.#timers.add(poll);
  }

  async stop(): Promise<Record<string, number>> {
    this.#stopped = true;
    const openAtEnd = this.#conns.size;
    for (const t of this.#timers) clearTimeout(t);
    for (const c of this.#conns) c.close();
    for (const s of this.#connecting) s.destroy();
    const closedByReceiver = this.#closedByReceiver;
    const failed = this.#failed;
    return { peers: this.count, opened: this.#opened, proven: this.#proven, closed_by_receiver: closedByReceiver, failed, open_at_end: openAtEnd };
  }
}

// ---- one run ----

interface Sample {
  downtime_ms: number;
  total_ms: number;
  verified: boolean;
  auth: string;
  /** what the chooser did (an lz4 round on loopback is slower: issue 21), to tell an outlier's cause */
  rounds: number;
  lz4_pages: number;
  /** the receiver's, from listening to its report: in the measured cases, with the crowd's time alone */
  cpu_destination_s: number;
  /** runDemo's only: the guest's heartbeat gap and its pages checked at the destination */
  guest_gap_ms?: number;
  bad_pages?: number;
}

interface Run {
  sample?: Sample;
  error?: string;
  crowd?: Record<string, unknown>;
  receiver?: Readings;
}

const demoSample = (r: DemoReport): Sample => ({
  downtime_ms: r.downtime_ms,
  total_ms: r.total_ms,
  verified: r.verified,
  auth: r.security.auth,
  rounds: r.rounds,
  lz4_pages: r.lz4_pages,
  cpu_destination_s: r.cpu_s.destination,
  guest_gap_ms: r.guest_gap_ms,
  bad_pages: r.guest_verified.bad,
});

const guest = { size, content: 'mixed' as const, rate: 64, pattern: 'uniform' as const, hotSize: 64 << 20 };

/**
 * The measured part of a run, once the receiver listens: readings before, the crowd alone,
 * readings after, then the crowd back for the migration (none of it when `make` gives none).
 */
class Measured {
  readonly readings: Readings = {
    before: null,
    crowd_alone_peak: null,
    after_3s: null,
    after_gc: null,
    after_gc_heap: null,
    migration_peak: null,
    gc_forced: false,
  };
  readonly crowd: Record<string, unknown> = {};
  #peak: PeakHeld | undefined;
  #disturbance: Disturbance | undefined;

  constructor(readonly make: () => Disturbance | undefined) {}

  async listening(pid: number, port: number): Promise<void> {
    if (!pid) throw new Error(`no process found listening on port ${port}`);
    const first = await forceGc(pid);
    this.readings.before = held(pid) ?? null;
    const alone = this.make();
    const peak = new PeakHeld(pid);
    await alone?.start(port);
    await sleep(soakMs);
    if (alone) this.crowd['alone'] = await alone.stop();
    this.readings.crowd_alone_peak = peak.stop();
    await sleep(SETTLE_MS);
    this.readings.after_3s = held(pid) ?? null;
    const second = await forceGc(pid);
    this.readings.after_gc = held(pid) ?? null;
    this.readings.after_gc_heap = second ?? null;
    this.readings.gc_forced = first !== undefined && second !== undefined;
    this.#peak = new PeakHeld(pid);
    this.#disturbance = this.make();
    await this.#disturbance?.start(port);
  }

  async done(): Promise<void> {
    if (this.#disturbance) this.crowd['with_migration'] = await this.#disturbance.stop();
    this.readings.migration_peak = this.#peak?.stop() ?? null;
  }
}

async function idleRun(crowded: boolean): Promise<Run> {
  const crowd = crowded ? new IdleCrowd(idleCount) : undefined;
  let run: Run;
  try {
    run = { sample: demoSample(await runDemo({ guest, ...(crowd ? { onListening: (port: number) => crowd.start(port) } : {}) })) };
  } catch (e) {
    run = { error: (e as Error).message };
  }
  const stats = await crowd?.stop();
  return { ...run, ...(stats ? { crowd: { ...stats, redial_s: redialMs !== undefined ? redialMs / 1000 : null } } : {}) };
}

async function sameAddressRun(crowded: boolean): Promise<Run> {
  const m = new Measured(() => (crowded ? new SameAddressCrowd() : undefined));
  let run: Run;
  try {
    // mutual TLS on both runs: the crowd's 0x16 opens a handshake the receiver waits on
    run = { sample: demoSample(await runDemo({ guest, secure: true, onListening: (port) => m.listening(listenerPid(port), port) })) };
  } catch (e) {
    run = { error: (e as Error).message };
  }
  await m.done();
  return { ...run, ...(crowded ? { crowd: m.crowd } : {}), receiver: m.readings };
}

let psk: { file: string; credentials: Credentials } | undefined;
function pskOnce(): { file: string; credentials: Credentials } {
  if (!psk) {
    const key = randomBytes(32);
    const file = path.join(work, 'bench.psk');
    writeFileSync(file, `bench-faults:${key.toString('hex')}\n`, { mode: 0o600 });
    psk = { file, credentials: { kind: 'psk', identity: 'bench-faults', key } };
  }
  return psk;
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

async function killAndWait(pid: number): Promise<void> {
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  // a guest tearing down its memory would run beside the next run
  for (let i = 0; i < 500 && alive(pid); i++) await sleep(10);
  if (alive(pid)) process.kill(pid, 'SIGKILL');
}

async function silentRun(crowded: boolean): Promise<Run> {
  const { file, credentials } = pskOnce();
  const m = new Measured(() => (crowded ? new SilentPeers(SILENT_PEERS, credentials) : undefined));
  const rx = spawn(process.execPath, [CLI_ENTRY, 'receive', '--listen', '127.0.0.1:0', '--psk-file', file], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, UV_THREADPOOL_SIZE: '4' },
  });
  const lines = createInterface({ input: rx.stdout! })[Symbol.asyncIterator]();
  const guests: number[] = [];
  let run: Run;
  try {
    const first = await lines.next();
    if (first.done) throw new Error('the receiver exited before listening');
    const { port } = JSON.parse(first.value as string) as { port: number };
    await m.listening(rx.pid!, port);
    const tx = spawn(process.execPath, [CLI_ENTRY, 'send', '--to', `127.0.0.1:${port}`, '--psk-file', file, '--size', String(size), '--rate', '0', '--json'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    tx.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    await once(tx, 'close');
    type SendLine = MigrationReport & { error?: { message: string }; source_guest?: string; guest_pid?: number };
    const last = JSON.parse(out.trim().split('\n').pop() || '{}') as SendLine;
    if (last.error) {
      // a failed send leaves its guest running (or paused) on: not past this run
      if (last.guest_pid && last.source_guest !== 'released') guests.push(last.guest_pid);
      throw new Error(`send: ${last.error.message}`);
    }
    // the receiver's outcome, past {receiving} and the crowd's {refused} lines
    let outcome: { guest_pid?: number; cpu_s?: { user: number; system: number }; error?: { message: string } } | undefined;
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), 30_000)));
    for (;;) {
      const next = await Promise.race([lines.next(), deadline]);
      if (!next || next.done) break;
      const o = JSON.parse(next.value as string) as Record<string, unknown>;
      if ('received' in o || 'error' in o) {
        outcome = o as typeof outcome;
        break;
      }
    }
    clearTimeout(timer);
    if (outcome?.guest_pid) guests.push(outcome.guest_pid);
    run = {
      sample: {
        downtime_ms: last.downtime_ms,
        total_ms: last.total_ms,
        verified: last.verified,
        auth: last.security.auth,
        rounds: last.rounds,
        lz4_pages: last.lz4_pages,
        cpu_destination_s: outcome?.cpu_s ? +(outcome.cpu_s.user + outcome.cpu_s.system).toFixed(3) : Number.NaN,
      },
    };
  } catch (e) {
    run = { error: (e as Error).message };
  }
  await m.done();
  if (rx.exitCode === null && rx.signalCode === null) {
    const exited = once(rx, 'exit');
    rx.kill();
    await exited;
  }
  for (const pid of guests) await killAndWait(pid);
  return { ...run, ...(crowded ? { crowd: m.crowd } : {}), receiver: m.readings };
}

// ---- the cases and their summaries ----

const range = (xs: number[]) => (xs.length ? { median: +median(xs).toFixed(2), min: +Math.min(...xs).toFixed(2), max: +Math.max(...xs).toFixed(2) } : null);

function medianHeld(hs: (Held | null)[]): Held | null {
  const ok = hs.filter((h): h is Held => h !== null);
  if (!ok.length) return null;
  return { rss_mib: +median(ok.map((h) => h.rss_mib)).toFixed(1), anon_mib: +median(ok.map((h) => h.anon_mib)).toFixed(1), fds: median(ok.map((h) => h.fds)) };
}

function receiverSummary(rs: Readings[]): Record<string, unknown> | undefined {
  if (!rs.length) return undefined;
  const keys = ['before', 'crowd_alone_peak', 'after_3s', 'after_gc', 'migration_peak'] as const;
  const heaps = rs.flatMap((r) => (r.after_gc_heap ? [r.after_gc_heap] : []));
  const mid = (f: (h: HeapAfterGc) => number): number => +median(heaps.map(f)).toFixed(1);
  const heap = heaps.length ? { heap_used_mib: mid((h) => h.heap_used_mib), external_mib: mid((h) => h.external_mib) } : null;
  return { ...Object.fromEntries(keys.map((k) => [k, medianHeld(rs.map((r) => r[k]))])), after_gc_heap: heap, gc_forced: rs.every((r) => r.gc_forced) };
}

const RUNNERS: Record<CaseName, (crowded: boolean) => Promise<Run>> = {
  idle: idleRun,
  'crowd-same-address': sameAddressRun,
  'silent-authenticated': silentRun,
};

function caseSettings(name: CaseName): Record<string, unknown> {
  if (name === 'idle') return { idle: idleCount, redial_s: redialMs !== undefined ? redialMs / 1000 : null };
  const common = { soak_s: soakMs / 1000, settle_s: SETTLE_MS / 1000 };
  if (name === 'crowd-same-address') return { loops: SAME_ADDRESS_LOOPS, from: '127.0.0.1', auth: 'tls-cert', ...common };
  return { peers: SILENT_PEERS, auth: 'tls-psk', receiver_pool: 4, sender: 'livemig send --rate 0', ...common };
}

for (const name of cases) {
  const calm: Run[] = [];
  const crowded: Run[] = [];
  for (let i = 0; i < runs; i++) {
    for (const [migration, into] of [
      ['undisturbed', calm],
      ['crowded', crowded],
    ] as const) {
      const r = await RUNNERS[name](migration === 'crowded');
      into.push(r);
      const { sample, ...rest } = r;
      emit({ bench: 'faults', case: name, migration, run: i, ...sample, ...rest });
    }
  }
  const ok = (rs: Run[]): Sample[] => rs.flatMap((r) => (r.sample ? [r.sample] : []));
  const [a, b] = [ok(calm), ok(crowded)];
  const ratio = (f: (s: Sample) => number): number | null => (a.length && b.length ? +(median(b.map(f)) / median(a.map(f))).toFixed(3) : null);
  const r = { downtime: ratio((s) => s.downtime_ms), total: ratio((s) => s.total_ms) };
  const side = (ss: Sample[], rs: Run[]) => ({
    downtime_ms: range(ss.map((s) => s.downtime_ms)),
    total_ms: range(ss.map((s) => s.total_ms)),
    failed: rs.length - ss.length,
    ...(name === 'idle' ? {} : { receiver: receiverSummary(rs.flatMap((x) => (x.receiver ? [x.receiver] : []))) }),
  });
  emit({
    bench: 'faults',
    summary: true,
    case: name,
    size,
    runs,
    ...caseSettings(name),
    undisturbed: side(a, calm),
    crowded: side(b, crowded),
    ratio: r,
    within_10pct: r.downtime !== null && r.total !== null && r.downtime <= 1.1 && r.total <= 1.1,
    all_verified: [...calm, ...crowded].every((x) => x.sample !== undefined && x.sample.verified && (x.sample.bad_pages ?? 0) === 0),
    machine: machine(),
  });
}
