/**
 * The fault matrix (issue 18, point 6): `livemig send` and `livemig receive` in two network
 * namespaces joined by a veth pair, authenticated with a PSK, 64 MiB reference guests writing
 * all the time. For each stage × fault × side, a real fault hits one side at that exact step
 * (test/fixtures/fault-hook.ts): SIGKILL, SIGSTOP (continued after FAULT_MS), the link
 * black-holed with iptables DROP (lifted after FAULT_MS), or every connection reset.
 * Afterwards exactly one guest runs: on the source before the commitment, on the destination
 * after it; its memory checks out against the reference guest's model (SIGUSR2: it checks
 * every page); the running guest was never paused longer than the max pause, its lease and the
 * resolve timeout allow; every failure names its stage. The matrix is printed with its counts.
 *
 * Cells with a disk (the guest writes a 32 MiB disk image throughout; the receiver creates its
 * own): the same verdicts, and the running guest's disk checks out block by block too.
 *
 * Post-copy × SIGKILL is the one row where no guest can run afterwards: the pages not yet moved
 * live only in the process that died (as in every post-copy engine). There the survivor must
 * say so, with its stage, and must not run a copy of its own.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { monotonicMs } from '../src/workload/clock.js';
import { STEP, type Side, type Stage } from './fixtures/fault-steps.js';
import { guestCheck, type GuestBeat } from './helpers.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const MAIN = path.join(here, '..', 'src', 'cli', 'main.js');
const HOOK = path.join(here, 'fixtures', 'fault-hook.js');
const RELAY = path.join(here, 'fixtures', 'beat-relay.js');

/*
 * The cell's deadlines, chosen so that no verdict depends on how fast or busy the host is:
 * - DEADLINE_S: the deadlines a fault before the commitment must trip (the handshake and progress
 *   timeouts of both sides, the source's max pause). Each must outlast the slowest step a loaded
 *   host takes by itself, or it fires before the fault's step and the cell proves nothing:
 *   reserving the 64 MiB took 3.7 s at a load of 13 on 2 CPUs, 12.8 s at a load of 60; a
 *   round's silence passed 10 s there.
 * - FAULT_MS: a stop or black-hole outlasts every deadline that must fire (DEADLINE_S, checked
 *   every second at most; the guest's lease, max pause + LEASE_SLACK_MS), with as much again for
 *   the late timers of a loaded host.
 * - RESOLVE_S: after the commitment the source asks the destination this long, the destination
 *   lingers as long to answer, and post-copy waits as long for a broken link (recover): each must
 *   outlast the fault, so that the link comes back within it and the outcome is learnt.
 */
const DEADLINE_S = 20;
const FAULT_MS = 2 * DEADLINE_S * 1000;
const MAX_PAUSE_MS = DEADLINE_S * 1000;
/** the guest's lease runs this much past the max pause (src/guest/source-session.ts) */
const LEASE_SLACK_MS = 1000;
const RESOLVE_S = FAULT_MS / 1000 + 15;
/** generous bounds for what the harness waits for by event: a bound passed is a failure, never a verdict (the
 * running guest's check is waited for by its beats, test/helpers.ts) */
const STEP_BOUND_MS = 300_000;
/** after both livemig processes ended: how long a guest left alive may stay silent before it counts as paused */
const SETTLE_BOUND_MS = 30_000;
const BEAT_PORT = 47001;
const PARALLEL = 8;

type Fault = 'kill' | 'stop' | 'drop' | 'reset';
const STAGES: Stage[] = ['handshake', 'reservation', 'first round', 'later round', 'pause', 'after COMMIT', 'post-copy'];
const FAULTS: Fault[] = ['kill', 'stop', 'drop', 'reset'];
const SIDES: Side[] = ['source', 'destination'];
/** the cells run again with a disk: a reset at each of these stages, and a SIGKILL at the pause, on each side */
const DISK_CELLS: { stage: Stage; fault: Fault }[] = [
  { stage: 'first round', fault: 'reset' },
  { stage: 'pause', fault: 'reset' },
  { stage: 'after COMMIT', fault: 'reset' },
  { stage: 'post-copy', fault: 'reset' },
  { stage: 'pause', fault: 'kill' },
];

const run = (...a: string[]): string => execFileSync(a[0]!, a.slice(1), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Beat extends GuestBeat {
  /** when the guest sent it: its own stamp (CLOCK_MONOTONIC, ms), not when a busy test read it */
  at: number;
}

/** The process is there and not a zombie (an orphan whose exit nobody collected yet). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** Two namespaces, a veth pair between them, and a heartbeat relay in each. */
class Hosts {
  readonly src: string;
  readonly dst: string;
  readonly srcDev: string;
  readonly dstDev: string;
  readonly dstAddr: string;
  readonly beats: { source: Beat[]; destination: Beat[] } = { source: [], destination: [] };
  readonly #relays: ChildProcess[] = [];

  constructor(readonly index: number) {
    const tag = `${process.pid % 10000}-${index}`;
    this.src = `lmf-src-${tag}`;
    this.dst = `lmf-dst-${tag}`;
    this.srcDev = `lmf${process.pid % 10000}s${index}`;
    this.dstDev = `lmf${process.pid % 10000}d${index}`;
    this.dstAddr = `10.79.${index}.2`;
    this.remove();
    run('ip', 'netns', 'add', this.src);
    run('ip', 'netns', 'add', this.dst);
    run('ip', 'link', 'add', this.srcDev, 'netns', this.src, 'type', 'veth', 'peer', 'name', this.dstDev, 'netns', this.dst);
    run('ip', '-n', this.src, 'addr', 'add', `10.79.${index}.1/30`, 'dev', this.srcDev);
    run('ip', '-n', this.dst, 'addr', 'add', `${this.dstAddr}/30`, 'dev', this.dstDev);
    for (const [ns, dev] of [
      [this.src, this.srcDev],
      [this.dst, this.dstDev],
    ] as const) {
      run('ip', '-n', ns, 'link', 'set', dev, 'up');
      run('ip', '-n', ns, 'link', 'set', 'lo', 'up');
    }
  }

  async startRelays(): Promise<void> {
    for (const side of SIDES) {
      const relay = spawn('ip', ['netns', 'exec', this.ns(side), process.execPath, RELAY, String(BEAT_PORT)], { stdio: ['ignore', 'pipe', 'inherit'] });
      this.#relays.push(relay);
      const lines = createInterface({ input: relay.stdout! });
      await new Promise<void>((ready) => {
        lines.on('line', (line) => {
          const m = JSON.parse(line) as { relay?: number; pid?: number; seq?: number; writes?: string; t?: number; verify?: { bad: number } };
          if (m.relay !== undefined) return ready();
          this.beats[side].push({ pid: m.pid!, seq: m.seq!, writes: m.writes ?? '0', at: m.t ?? monotonicMs(), ...(m.verify ? { verify: m.verify } : {}) });
        });
      });
    }
  }

  ns(side: Side): string {
    return side === 'source' ? this.src : this.dst;
  }
  dev(side: Side): string {
    return side === 'source' ? this.srcDev : this.dstDev;
  }

  /** Every process left in the namespace but its relay. */
  pids(side: Side): number[] {
    const relays = new Set(this.#relays.map((r) => r.pid));
    return run('ip', 'netns', 'pids', this.ns(side))
      .split(/\s+/)
      .filter((s) => s)
      .map(Number)
      .filter((p) => !relays.has(p) && alive(p));
  }

  /** Between cells: no process, no rule, no beat left. */
  reset(): void {
    for (const side of SIDES) {
      for (const pid of this.pids(side)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone meanwhile
        }
      }
      run('ip', 'netns', 'exec', this.ns(side), 'iptables', '-F');
      this.beats[side].length = 0;
    }
  }

  remove(): void {
    for (const r of this.#relays) r.kill('SIGKILL');
    for (const ns of [this.src, this.dst]) {
      try {
        run('ip', 'netns', 'del', ns);
      } catch {
        // not there
      }
    }
  }
}

interface Outcome {
  stage: Stage;
  fault: Fault;
  side: Side;
  /** the guest had a disk */
  disk: boolean;
  /** where a guest runs afterwards */
  runs: Side | 'none' | 'both';
  send?: { error?: { code: string; phase: string; message: string }; source_guest?: string };
  receive?: { error?: { code: string; phase: string; message: string }; received?: unknown };
  verifyBad?: number;
  longestSourceGapMs: number;
  /** where that gap was: seconds into the cell, and how many beats the guest numbered across it (1: none sent) */
  gapAt?: { s: number; seqs: number; beats: number };
  /** the receiver refused the connection before reserving and went on listening */
  stillListening?: boolean;
  /** guests left alive but silent once both sides had ended (paused), and guests that beat in the cell and exited */
  silent?: number[];
  /** what each silent guest was doing (/proc) and when it last beat: how a cell that failed on one is explained */
  silentState?: string[];
  exited?: number[];
  /** the fault's step was never reached: the cell proves nothing, and says why */
  notFired?: string;
  /** the cell could not be run to its end */
  broken?: string;
  /** a side that left no report: how it ended and the tail of what it printed */
  unreported?: string[];
}

interface Lines {
  all: Record<string, unknown>[];
  /** the end of what the process wrote on stderr (a process that ends without an outcome line says why there) */
  stderr(): string;
  first(pred: (m: Record<string, unknown>) => boolean, ms: number): Promise<Record<string, unknown>>;
}

function lines(child: ChildProcess): Lines {
  const all: Record<string, unknown>[] = [];
  const waiters: (() => void)[] = [];
  let err = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => void (err = (err + d).slice(-2000)));
  createInterface({ input: child.stdout! }).on('line', (line) => {
    try {
      all.push(JSON.parse(line) as Record<string, unknown>);
    } catch {
      return;
    }
    for (const w of waiters.splice(0)) w();
  });
  return {
    all,
    stderr: () => err.trim(),
    async first(pred, ms) {
      const t = performance.now() + ms;
      for (;;) {
        const m = all.find(pred);
        if (m) return m;
        if (performance.now() > t) throw new Error('timed out waiting for a line');
        await Promise.race([new Promise<void>((r) => waiters.push(r)), sleep(100)]);
      }
    },
  };
}

const gone = (c: ChildProcess): boolean => c.exitCode !== null || c.signalCode !== null;
const exited = (c: ChildProcess, ms: number): Promise<boolean> =>
  gone(c)
    ? Promise.resolve(true)
    : new Promise<boolean>((r) => {
        // (the timer is cleared: a pending one would hold the test file's process open)
        const t = setTimeout(() => r(false), ms);
        c.once('exit', () => (clearTimeout(t), r(true)));
      });
/** Polls `cond` (whose answer comes from events: lines, exits, files) until it holds or `ms` passed; whether it holds. */
async function until(cond: () => boolean, ms: number, every = 20): Promise<boolean> {
  for (const by = performance.now() + ms; !cond(); await sleep(every)) if (performance.now() > by) return false;
  return true;
}

async function runCell(h: Hosts, dir: string, c: { stage: Stage; fault: Fault; side: Side; disk: boolean }, port: number): Promise<Outcome> {
  const { stage, fault, side, disk } = c;
  h.reset();
  // beats stamped before this (a guest the reset killed, its last datagrams still in the relay) are not this cell's
  const cellStart = monotonicMs();
  const cell = `${stage} × ${fault} × ${side}${disk ? ' (disk)' : ''}`;
  const diskDir = path.join(dir, `disks-${port}`);
  if (disk) mkdirSync(path.join(diskDir, 'destination'), { recursive: true });
  const receiveDisk = disk ? ['--disk-dir', path.join(diskDir, 'destination')] : [];
  const sendDisk = disk ? ['--disk', '32MiB', '--disk-rate', '4', '--disk-image', path.join(diskDir, 'source.img')] : [];
  const psk = path.join(dir, 'psk');
  const mark = path.join(dir, `mark-${h.index}`);
  rmSync(mark, { force: true });
  const step = STEP[stage][side];
  // the guests' directories (socket, log) go under the matrix's own directory, removed at its
  // end: a guest this matrix kills cannot remove its own, and 56 cells left ~50 in /tmp a run
  const plainEnv = { ...process.env, TMPDIR: dir };
  const hookEnv = { ...plainEnv, LIVEMIG_FAULT: JSON.stringify({ ...step, fault, dev: h.dev(side), port, mark }) };
  const postcopy = stage === 'post-copy' ? ['--mode', 'postcopy', '--postcopy-bandwidth', '32'] : [];
  const deadlines = ['--handshake-timeout', String(DEADLINE_S), '--progress-timeout', String(DEADLINE_S), '--recover-timeout', String(RESOLVE_S)];
  const receive = spawn(
    'ip',
    [
      'netns',
      'exec',
      h.dst,
      process.execPath,
      '--import',
      HOOK,
      MAIN,
      'receive',
      '--listen',
      `${h.dstAddr}:${port}`,
      '--psk-file',
      psk,
      ...deadlines,
      '--linger',
      String(RESOLVE_S),
      ...receiveDisk,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'], env: side === 'destination' ? hookEnv : plainEnv },
  );
  const rx = lines(receive);
  await rx.first((m) => 'listening' in m, STEP_BOUND_MS);
  const send = spawn(
    'ip',
    [
      'netns',
      'exec',
      h.src,
      process.execPath,
      '--import',
      HOOK,
      MAIN,
      'send',
      '--to',
      `${h.dstAddr}:${port}`,
      '--psk-file',
      psk,
      '--size',
      '64MiB',
      '--rate',
      '16',
      '--max-rounds',
      '3',
      '--downtime-limit',
      '0.5',
      ...deadlines,
      '--max-pause',
      String(MAX_PAUSE_MS),
      '--resolve-timeout',
      String(RESOLVE_S),
      '--heartbeat',
      `127.0.0.1:${BEAT_PORT}`,
      // gaps here are judged in seconds: 16 guests ticking every millisecond took most of a CPU
      '--beat-ms',
      '10',
      '--json',
      ...postcopy,
      ...sendDisk,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'], env: side === 'source' ? hookEnv : plainEnv },
  );
  const tx = lines(send);
  const faulted = side === 'source' ? send : receive;
  // the step must be reached: a cell whose fault never happened proves nothing, and says so
  await until(() => existsSync(mark) || gone(send) || gone(receive), STEP_BOUND_MS);
  if (!existsSync(mark)) {
    const ended = (c: ChildProcess): string => (gone(c) ? 'ended' : 'runs');
    const why = gone(send) || gone(receive) ? `send ${ended(send)}, receive ${ended(receive)}` : `not within ${STEP_BOUND_MS} ms`;
    send.kill('SIGKILL');
    receive.kill('SIGKILL');
    const said = `send: ${JSON.stringify(tx.all)} ${tx.stderr()}, receive: ${JSON.stringify(rx.all)} ${rx.stderr()}`;
    const notFired = `${cell}: not fired: the step '${step.event}' was never reached (${why}; ${said})`;
    return { stage, fault, side, disk, runs: 'none', longestSourceGapMs: 0, notFired };
  }
  if (fault === 'stop' || fault === 'drop') {
    await sleep(FAULT_MS);
    if (fault === 'stop') faulted.kill('SIGCONT');
    else run('ip', 'netns', 'exec', h.ns(side), 'iptables', '-F');
  }
  // both ends finish by themselves, within their deadlines: the bound is far past every one
  const bound = FAULT_MS + RESOLVE_S * 1000 + 60_000;
  const sendDone = await exited(send, bound);
  // the receiver: one that reserved ends with an outcome line and exits; one whose connection
  // failed before it reserved anything says so ({refused}) within its handshake deadline and
  // goes on listening, as it should: it is asked to stop then
  const reserved = (): boolean => rx.all.some((m) => !('listening' in m || 'refused' in m));
  await until(() => gone(receive) || reserved() || rx.all.some((m) => 'refused' in m), DEADLINE_S * 1000 + 60_000);
  const stillListening = !gone(receive) && !reserved();
  if (stillListening) receive.kill('SIGKILL');
  const receiveDone = stillListening || (await exited(receive, bound));
  const both = `${JSON.stringify(tx.all)} ${tx.stderr()} ${JSON.stringify(rx.all)} ${rx.stderr()}`;
  assert.ok(sendDone && receiveDone, `${cell}: a side did not finish (send ${sendDone}, receive ${receiveDone}): ${both}`);
  const sent = tx.all.find((m) => 'error' in m || 'version' in m || 'downtime_ms' in m || 'mode' in m) as Outcome['send'];
  const received = rx.all.find((m) => 'error' in m || 'received' in m) as Outcome['receive'];
  // who runs: both sides have ended, so nothing can change it any more. Each guest left in
  // either namespace beats (it runs), exits, or stays silent (paused: committed, not resolved);
  // wait until every one has beaten or exited, and take one silent past a generous bound as paused
  const t0 = monotonicMs();
  const beatSince = (s: Side, pid: number): boolean => h.beats[s].some((b) => b.pid === pid && b.at >= t0);
  await until(() => SIDES.every((s) => h.pids(s).every((pid) => beatSince(s, pid))), SETTLE_BOUND_MS, 200);
  const left = { source: h.pids('source'), destination: h.pids('destination') };
  const srcLive = left.source.filter((pid) => beatSince('source', pid));
  const dstLive = left.destination.filter((pid) => beatSince('destination', pid));
  const silent = SIDES.flatMap((s) => left[s].filter((pid) => !beatSince(s, pid)));
  const exitedGuests = SIDES.flatMap((s) => [...new Set(h.beats[s].map((b) => b.pid))].filter((pid) => !left[s].includes(pid)));
  assert.ok(srcLive.length <= 1 && dstLive.length <= 1, `${cell}: one guest per side at most: ${srcLive} ${dstLive}`);
  const runs: Outcome['runs'] = srcLive.length && dstLive.length ? 'both' : srcLive.length ? 'source' : dstLive.length ? 'destination' : 'none';
  // the running guest checks every page against its model
  let verifyBad: number | undefined;
  if (runs === 'source' || runs === 'destination') {
    const pid = (runs === 'source' ? srcLive : dstLive)[0]!;
    const beats = (): readonly GuestBeat[] => h.beats[runs];
    // a destination guest checks every page by itself once it runs (after activation, or once
    // post-copy has every page): that report first, then the check asked for now. Each is
    // waited for by the guest's beats, however long a loaded host takes (test/helpers.ts)
    const own = runs === 'destination' ? await guestCheck({ pid, beats }) : undefined;
    const now = await guestCheck({ pid, beats, ask: true });
    verifyBad = Math.max(now.bad, own?.bad ?? 0);
    // with a disk, its every block too (a check that did not cover it counts as a bad one)
    const diskBad = (v: { bad: number } | undefined): number => (v === undefined ? 0 : ((v as { disk?: { bad: number } }).disk?.bad ?? 1));
    if (disk) verifyBad = Math.max(verifyBad, diskBad(now), diskBad(own));
  }
  // the longest the source guest went without a beat while it was the one to run (its own stamps,
  // guest by guest: another guest's beats neither fill nor open a gap)
  let gap = 0;
  let gapAt: Outcome['gapAt'];
  const ours = h.beats.source.filter((b) => b.at >= cellStart);
  for (const pid of new Set(ours.map((b) => b.pid))) {
    const sb = ours.filter((b) => b.pid === pid).sort((a, b) => a.at - b.at);
    for (let i = 1; i < sb.length; i++) {
      if (sb[i]!.at - sb[i - 1]!.at <= gap) continue;
      gap = sb[i]!.at - sb[i - 1]!.at;
      gapAt = { s: Math.round((sb[i - 1]!.at - cellStart) / 100) / 10, seqs: sb[i]!.seq - sb[i - 1]!.seq, beats: sb.length };
    }
  }
  return {
    stage,
    fault,
    side,
    disk,
    runs,
    stillListening,
    ...(sent ? { send: sent } : {}),
    ...(received ? { receive: received } : {}),
    ...(verifyBad !== undefined ? { verifyBad } : {}),
    longestSourceGapMs: Math.round(gap),
    ...(gapAt ? { gapAt } : {}),
    ...(silent.length ? { silent, silentState: silent.map((pid) => describeSilent(pid, [...h.beats.source, ...h.beats.destination], t0)) } : {}),
    ...(exitedGuests.length ? { exited: exitedGuests } : {}),
    ...(sent && received ? {} : { unreported: [...(sent ? [] : [said('send', send, tx)]), ...(received ? [] : [said('receive', receive, rx)])] }),
  };
}

/** A side that printed no report: its exit and its stderr's tail explain why. */
function said(name: string, c: ChildProcess, l: Lines): string {
  return `${name} exited ${c.exitCode ?? c.signalCode}, stdout ${JSON.stringify(l.all).slice(-500)}, stderr ${l.stderr().slice(-1500)}`;
}

/**
 * A silent guest as /proc shows it: the process's state, each thread's state and scheduling
 * policy (0 normal, 5 idle), and its last beat relative to the settle's start (a guest seen
 * running that went quiet, or one never heard from in this cell).
 */
function describeSilent(pid: number, beats: readonly { pid: number; at: number; seq: number }[], t0: number): string {
  // /proc/PID/stat: "pid (comm) state ..."; the policy is field 41, the 39th after the state
  const fields = (stat: string): string[] => stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const threads = ((): string => {
    try {
      return readdirSync(`/proc/${pid}/task`)
        .map((tid) => {
          const f = fields(readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8'));
          return `${f[0]}${f[38]}`;
        })
        .join(' ');
    } catch (e) {
      return `unreadable: ${(e as Error).message}`;
    }
  })();
  const last = beats.filter((b) => b.pid === pid).at(-1);
  const heard = last ? `last beat seq ${last.seq} ${Math.round(t0 - last.at)} ms before the settle began` : 'no beat in this cell';
  return `${pid}: threads ${threads}; ${heard}; main thread waits in ${mainThreadWait(pid)}`;
}

/**
 * Where the main thread sleeps: its kernel stack's innermost frames (root only), else its wait
 * channel. An idle event loop waits in epoll; a write to a protected page not yet resolved, in
 * userfaultfd; a guest paused by livemig idles in epoll too, between its 5 ms checks.
 */
function mainThreadWait(pid: number): string {
  try {
    const stack = readFileSync(`/proc/${pid}/stack`, 'utf8').trim().split('\n').slice(0, 6);
    if (stack.length > 0 && stack[0] !== '') return stack.map((l) => l.replace(/^\[<[0-9a-f]+>\] /, '').replace(/\+0x.*$/, '')).join(' < ');
  } catch {
    // not root, or no stack tracing in this kernel: the wait channel says less, but something
  }
  try {
    return readFileSync(`/proc/${pid}/wchan`, 'utf8') || 'nothing (running)';
  } catch (e) {
    return `unreadable: ${(e as Error).message}`;
  }
}

const KNOWN_STAGES = new Set([
  'connect',
  'handshake',
  'reserve',
  'receiving',
  'precopy',
  'stop-and-copy',
  'commit',
  'committed',
  'activate',
  'activating',
  'postcopy',
  'hello',
  'transport',
  'attach',
  'resolve',
]);

function check(o: Outcome): void {
  const cell = `${o.stage} × ${o.fault} × ${o.side}${o.disk ? ' (disk)' : ''}`;
  if (o.notFired) assert.fail(o.notFired);
  if (o.broken) assert.fail(o.broken);
  const lost = o.stage === 'post-copy' && o.fault === 'kill';
  const committed = o.stage === 'after COMMIT' || o.stage === 'post-copy';
  if (lost) {
    assert.equal(o.runs === 'both' || o.runs === 'source', false, `${cell}: the source must not run its copy once post-copy began (runs: ${o.runs})`);
    const survivor = o.side === 'source' ? o.receive : o.send;
    assert.ok(survivor?.error, `${cell}: the survivor reports the loss: ${JSON.stringify(survivor)}`);
    // the destination died before the source heard that the guest ran there: the activation
    assert.ok(['postcopy', 'activate'].includes(survivor.error.phase), `${cell}: the loss names its stage: ${JSON.stringify(survivor.error)}`);
    return;
  }
  const guests = `silent ${o.silent ?? []} (${(o.silentState ?? []).join('; ')}), exited ${o.exited ?? []}`;
  const ends = `send ${JSON.stringify(o.send)}, receive ${JSON.stringify(o.receive)}${o.unreported ? `; ${o.unreported.join('; ')}` : ''}`;
  assert.ok(o.runs === 'source' || o.runs === 'destination', `${cell}: exactly one guest runs afterwards, got ${o.runs} (${ends}, ${guests})`);
  if (!committed) assert.equal(o.runs, 'source', `${cell}: before the commitment the guest runs on the source`);
  // after COMMIT the destination is the primary, unless COMMIT itself was lost in the fault and
  // the destination, asked, said it did not activate (then the source resumed: still one guest)
  if (committed && o.runs === 'source')
    assert.match(
      JSON.stringify(o.send?.error ?? {}),
      /did not activate/,
      `${cell}: the source runs after COMMIT only when the destination said it did not activate`,
    );
  assert.equal(o.verifyBad, 0, `${cell}: the running guest's memory checks out against the model`);
  if (o.runs === 'source')
    assert.ok(
      o.longestSourceGapMs < MAX_PAUSE_MS + LEASE_SLACK_MS + RESOLVE_S * 1000,
      `${cell}: the source guest was paused ${o.longestSourceGapMs} ms (${JSON.stringify(o.gapAt)})`,
    );
  for (const [who, r] of [
    ['send', o.send],
    ['receive', o.receive],
  ] as const) {
    if (r?.error) assert.ok(KNOWN_STAGES.has(r.error.phase), `${cell}: ${who}'s error names its stage: ${JSON.stringify(r.error)}`);
    if (r?.error) assert.match(r.error.code, /^ERR_LIVEMIG_/, `${cell}: ${who}'s error has a code`);
  }
  // the faulted side, when it lived to tell, and the other side agree on where the guest runs
  if (o.send && !o.send.error && o.runs === 'source') assert.fail(`${cell}: send says it migrated, but the guest runs on the source`);
}

function canRun(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (network namespaces, iptables)';
  for (const tool of ['ip', 'iptables', 'ss']) {
    try {
      execFileSync('which', [tool], { stdio: 'ignore' });
    } catch {
      return `needs ${tool} (.ci/run installs iptables)`;
    }
  }
  return undefined;
}

const TITLE = 'fault matrix: every stage × SIGKILL, SIGSTOP, black-hole, reset × each side leaves exactly one guest running, intact';
test(TITLE, { skip: canRun(), timeout: 45 * 60_000 }, async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'livemig-faults-'));
  writeFileSync(path.join(dir, 'psk'), `faults:${'5a'.repeat(32)}\n`, { mode: 0o600 });
  const hosts = Array.from({ length: PARALLEL }, (_, i) => new Hosts(i));
  try {
    for (const h of hosts) await h.startRelays();
    // LIVEMIG_FAULT_CELLS=stage:fault:side[:disk],... runs only those (to look into one by hand)
    const only = process.env['LIVEMIG_FAULT_CELLS']?.split(',');
    const cells = [
      ...STAGES.flatMap((stage) => FAULTS.flatMap((fault) => SIDES.map((side) => ({ stage, fault, side, disk: false })))),
      ...DISK_CELLS.flatMap((d) => SIDES.map((side) => ({ ...d, side, disk: true }))),
    ]
      .filter((c) => !only || only.includes(`${c.stage}:${c.fault}:${c.side}${c.disk ? ':disk' : ''}`))
      // LIVEMIG_FAULT_REPEAT=N runs each chosen cell N times (a flake under load, looked into by hand)
      .flatMap((c) => Array.from({ length: Number(process.env['LIVEMIG_FAULT_REPEAT'] ?? 1) }, () => c));
    const outcomes: Outcome[] = [];
    let next = 0;
    let port = 7900;
    await Promise.all(
      hosts.map(async (h) => {
        while (next < cells.length) {
          const c = cells[next++]!;
          const p = port++;
          outcomes.push(
            await runCell(h, dir, c, p).catch((e: unknown) => ({
              ...c,
              runs: 'none' as const,
              longestSourceGapMs: 0,
              broken: (e as Error).message,
            })),
          );
        }
      }),
    );
    // the matrix, then the checks (so that one failing cell does not hide the others)
    const failures: string[] = [];
    const counts: Record<string, number> = {};
    for (const [stage, disk] of [...STAGES.map((s) => [s, false] as const), ...STAGES.map((s) => [s, true] as const)]) {
      const row = outcomes.filter((o) => o.stage === stage && o.disk === disk);
      const cell = (o: Outcome): string => {
        let verdict = 'ok';
        try {
          check(o);
        } catch (e) {
          verdict = 'FAIL';
          failures.push((e as Error).message);
        }
        // a fault that never fired, or a cell that broke, is not a lost guest: each is named as such
        const runs = o.notFired ? 'not fired' : o.broken ? 'broken' : o.runs;
        counts[`${runs}/${verdict}`] = (counts[`${runs}/${verdict}`] ?? 0) + 1;
        const why = o.side === 'source' ? o.receive?.error?.code : o.send?.error?.code;
        return `${o.fault}@${o.side === 'source' ? 'src' : 'dst'}: ${runs} ${verdict}${why ? ` (${why.replace('ERR_LIVEMIG_', '')})` : ''}`;
      };
      if (row.length)
        process.stdout.write(
          `# ${(disk ? `${stage} +disk` : stage).padEnd(19)} ${FAULTS.flatMap((f) => SIDES.map((s) => row.find((o) => o.fault === f && o.side === s)))
            .filter((o) => o !== undefined)
            .map(cell)
            .join(' | ')}\n`,
        );
    }
    const passed = Object.entries(counts).reduce((n, [k, c]) => n + (k.endsWith('/ok') ? c : 0), 0);
    process.stdout.write(
      `# ${passed} of ${outcomes.length} cells pass: ${Object.entries(counts)
        .map(([k, n]) => `${k} ${n}`)
        .join(', ')}\n`,
    );
    if (only) for (const o of outcomes) process.stdout.write(`# ${JSON.stringify(o)}\n`);
    assert.deepEqual(failures, [], failures.join('\n'));
  } finally {
    for (const h of hosts) {
      h.reset();
      h.remove();
    }
    rmSync(dir, { recursive: true, force: true });
  }
});
