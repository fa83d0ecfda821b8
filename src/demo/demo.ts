/**
 * The demo: a reference guest, a receiver (`livemig receive`, its own process) and a sender,
 * on loopback or across a namespace link; the guest migrates live and checks every page at
 * the destination. Used by `livemig demo` and by the benchmarks.
 */
import type { HugePages } from '../region/huge-pages.js';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LivemigError, invalidArgument } from '../errors.js';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { makeTestCa, writeTestCa } from '../security/test-ca.js';
import { isLoopback, type Credentials } from '../security/tls.js';
import { migrate } from '../source/migrate.js';
import type { MigrateOptions, MigrationReport, ProgressEvent } from '../source/types.js';
import { CONTENTS, PATTERNS, type ContentName, type PatternName } from '../workload/content.js';
import { monotonicMs } from '../workload/clock.js';
import { extentPages } from '../pages/extents.js';
import { PAGE_SIZE } from '../region/region.js';
import { isSameProcess, processRef, signalProcess, type ProcessRef } from '../process-ref.js';
import { HeartbeatObserver, SourceGuest, cGuestArgs, cIncomingCommand } from '../workload/controller.js';

const CLI_ENTRY = fileURLToPath(new URL('../cli/main.js', import.meta.url));

export interface DemoReport extends MigrationReport {
  /** largest heartbeat gap from the first page sent (the window of total_ms) to after the check */
  guest_gap_ms: number;
  /**
   * largest heartbeat gap during the handshake and the destination's reservation. Reported apart:
   * here the destination shares the source's VM, whose first touch of fresh memory stalls it at
   * the host level (bench/RESULTS.md); across two hosts it cannot reach the guest.
   */
  guest_gap_preparation_ms: number;
  /** the downtime as the guest felt it: the heartbeat gap across the pause, its last beat here to its first there */
  guest_downtime_ms?: number;
  guest_verified: {
    bad: number;
    first_bad: number;
    writes: string;
    verify_ms: number;
    /** the guest's disk, every block checked against its model */
    disk?: { bad: number; first_bad: number; writes: string; blocks: number };
  };
  /** the destination's post-copy figures: faults, latency percentiles, pages pulled and pushed */
  destination_postcopy?: Record<string, number>;
  content: string;
  rate_mib_s: number;
  pattern: string;
  /**
   * CPU seconds (user + system) of each side's livemig process: this one from the handshake to
   * the report, the receiver's from listening to its report (the guests are processes of their own)
   */
  cpu_s: { source: number; destination: number };
  /** the guest's memory the source host held (its memfd's data, SEEK_DATA) before the migration and when it released the guest */
  source_memory: { held_before_bytes: number; held_at_release_bytes: number };
}

/** The reference guest a demo migrates (see docs/CONTENT.md). */
export interface GuestSpec {
  size: number;
  content: ContentName;
  /** MiB/s the guest writes */
  rate: number;
  pattern: PatternName;
  /** the hot pattern's hot set, bytes */
  hotSize: number;
  /** the backing of its memory (default none: 4 KiB shmem) */
  hugePages?: HugePages;
  /** the guest registers no write tracking: livemig hashes every page each round */
  noTrack?: boolean;
  /** a disk: bytes, MB/s of random 4 KiB writes, and whether the guest reports them (default) */
  /** ask: the C guest at the destination asks for its blocks itself in post-copy (lmg_disk_fetch, lmg_disk_overwrite) */
  disk?: { size: number; rate: number; noTrack?: boolean; ask?: boolean };
}

/** A GuestSpec from names given as strings (a benchmark's flags), checked. */
export function guestSpecOf(g: { size: number; content: string; rate: number; pattern: string; hotSize: number; hugePages?: HugePages }): GuestSpec {
  if (!(CONTENTS as readonly string[]).includes(g.content)) throw invalidArgument(`content must be one of ${CONTENTS.join(', ')}, got '${g.content}'`);
  if (!(PATTERNS as readonly string[]).includes(g.pattern)) throw invalidArgument(`pattern must be one of ${PATTERNS.join(', ')}, got '${g.pattern}'`);
  return { ...g, content: g.content as ContentName, pattern: g.pattern as PatternName };
}

/** Where the demo's receiver runs: a command prefix (e.g. `ip netns exec NAME`) and the address it listens on. */
export interface ReceiverPlace {
  prefix: string[];
  host: string;
  /** where the heartbeat observer listens, when the receiver is across a link */
  observer?: string;
}

/** The convergence settings a demo passes on to migrate() (see MigrateOptions). */
export type PolicyFlags = Pick<
  MigrateOptions,
  | 'onStall'
  | 'bandwidthMiBps'
  | 'postcopyBandwidthMiBps'
  | 'deadlineMs'
  | 'wws'
  | 'rateAdaptation'
  | 'maxBytes'
  | 'mode'
  | 'maxPauseMs'
  | 'progressTimeoutMs'
  | 'resolveTimeoutMs'
  | 'handshakeTimeoutMs'
  | 'recoverTimeoutMs'
  | 'channels'
  | 'readPath'
>;

export interface DemoOptions {
  guest: GuestSpec;
  /** default 50 ms */
  downtimeLimitMs?: number;
  /** default 30 */
  maxRounds?: number;
  onProgress?(e: ProgressEvent): void;
  /** the naive stop-and-copy baseline: pause first, send everything once, then resume there */
  naive?: boolean;
  /** default: every encoding on */
  encodings?: { zero: boolean; dedup: boolean; compress: boolean };
  /** more flags for `livemig receive` */
  receiverArgs?: string[];
  /** default: loopback, in this namespace */
  receiverAt?: ReceiverPlace;
  policy?: PolicyFlags;
  /** mutual TLS from a fresh test CA (src/security/test-ca.ts): authenticated, encrypted */
  secure?: boolean;
  /** called once the receiver listens, before the guest starts (a benchmark crowds it here) */
  onListening?(port: number): void | Promise<void>;
  /**
   * which guest moves: the reference guest (default; `guest` describes it) or the C example
   * guest on both ends (native/guest/example; two regions, 192 and 64 MiB, writing at guest.rate)
   */
  guestKind?: 'reference' | 'c';
  /** a same-host upgrade: the guest's memfds go to the destination guest; no page is copied */
  local?: boolean;
  /** with a disk: the directory its images go in (SOURCE.img, and destination/ for the receiver's; default a temporary one, removed after) */
  diskDir?: string;
}

/** Runs receiver, guest and sender on loopback (or across a namespace link) and migrates the guest live. */
// eslint-disable-next-line max-lines-per-function -- 133 lines of one story: start guest and receiver, migrate, check, tear down (issue 30)
export async function runDemo(o: DemoOptions): Promise<DemoReport> {
  const g = o.guest;
  const naive = o.naive ?? false;
  const encodings = o.encodings ?? { zero: true, dedup: true, compress: true };
  const receiverAt = o.receiverAt ?? { prefix: [], host: '127.0.0.1' };
  const receiverArgs = o.receiverArgs ?? [];
  const policy = o.policy ?? {};
  const onProgress = o.onProgress;
  const downtimeLimitMs = o.downtimeLimitMs ?? 50;
  const maxRounds = o.maxRounds ?? 30;
  // heartbeats from both guests must reach the observer: across a namespace link, on its near end
  const observer = await HeartbeatObserver.start(receiverAt.observer);
  // a receiver in a test namespace is off loopback: the demo runs it without credentials on purpose
  const insecure = isLoopback(receiverAt.host) || o.secure ? [] : ['--insecure'];
  const secure = o.secure ? secureDemo() : undefined;
  const kind = o.guestKind ?? 'reference';
  // a disk's images: the source's, and the directory the receiver creates the destination's in
  const diskDir = g.disk ? (o.diskDir ?? mkdtempSync(path.join(os.tmpdir(), 'livemig-demo-disk-'))) : undefined;
  const disk = g.disk && diskDir ? { ...g.disk, path: path.join(diskDir, 'source.img') } : undefined;
  if (diskDir) mkdirSync(path.join(diskDir, 'destination'));
  const guestExec = kind === 'c' ? ['--guest-exec', cIncomingCommand({ diskAsk: g.disk?.ask === true }).join(' ')] : [];
  const rxCommand = [
    ...receiverAt.prefix,
    process.execPath,
    CLI_ENTRY,
    'receive',
    '--listen',
    `${receiverAt.host}:0`,
    ...insecure,
    ...(secure?.receiverArgs ?? []),
    ...guestExec,
    ...(diskDir ? ['--disk-dir', path.join(diskDir, 'destination')] : []),
    ...receiverArgs,
  ];
  const receiver = spawn(rxCommand[0]!, rxCommand.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]();
  let guest: SourceGuest | undefined;
  let destPid = 0;
  let dest: ProcessRef | undefined;
  // stopped from outside (^C, a timeout): the guests and the receiver go with the demo
  const onSignal = (sig: NodeJS.Signals): void => {
    if (dest) signalProcess(dest, 'SIGKILL');
    for (const child of [guest?.child, receiver]) child?.kill('SIGKILL');
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const first = await lines.next();
    if (first.done) throw new LivemigError('ERR_LIVEMIG_CONNECTION', 'the receiver exited before listening', { phase: 'demo' });
    const { port } = JSON.parse(first.value) as { port: number };
    await o.onListening?.(port);
    guest =
      kind === 'c'
        ? await SourceGuest.start((socket) =>
            cGuestArgs(socket, {
              rate: g.rate,
              heartbeat: observer.address,
              sparse: g.content === 'sparse',
              ...(g.hugePages ? { hugePages: g.hugePages } : {}),
              ...(disk ? { diskImage: disk } : {}),
            }),
          )
        : await SourceGuest.spawn({ ...withoutDisk(g), heartbeat: observer.address, ...(disk ? { diskImage: disk } : {}) });
    await new Promise((r) => setTimeout(r, 300)); // let the guest's writes reach their rate
    const tStart = monotonicMs();
    let tMigrating: number | undefined;
    let tPaused: number | undefined;
    const progress = (e: ProgressEvent): void => {
      if (e.type === 'handshake') tMigrating = monotonicMs();
      if (e.type === 'activated') tPaused = monotonicMs() - e.downtime_ms;
      onProgress?.(e);
    };
    const source = guest;
    const early = naive ? await source.pause() : undefined;
    // what the source host holds of the guest's memory, before and as it is released: reading
    // a hole would allocate it, so this grows only by what the guest itself wrote meanwhile
    const heldBefore = o.local ? 0 : extentPages(await source.region.dataExtents());
    let heldAtRelease = heldBefore;
    const cpu0 = process.cpuUsage();
    const report = await migrate({
      ...source.memory,
      ...(o.local ? { local: { pieces: source.session.pieces } } : {}),
      to: { host: receiverAt.host, port },
      insecure: !isLoopback(receiverAt.host) && !secure,
      ...(secure ? { credentials: secure.credentials } : {}),
      pause: early ? async () => early : (lease) => source.pause(lease),
      commit: () => source.commit(),
      resume: () => source.resume(),
      release: async () => {
        if (!o.local) heldAtRelease = extentPages(await source.region.dataExtents());
        await source.exit();
      },
      downtimeLimitMs: naive ? Number.MAX_SAFE_INTEGER : downtimeLimitMs,
      maxRounds: naive ? 1 : maxRounds,
      encodings: naive ? { zero: false, dedup: false, compress: false } : encodings,
      throttle: (p) => source.throttle(p),
      ...(naive ? { wws: false } : policy),
      onProgress: progress,
    });
    const cpu = process.cpuUsage(cpu0);
    if (early) report.downtime_ms = +(report.prep_ms + report.total_ms).toFixed(3); // paused from before the handshake to activation
    // the outcome, past the progress line ({receiving}) and connections refused before it
    const notOutcome = (line: string): boolean => {
      const m = JSON.parse(line) as Record<string, unknown>;
      return 'receiving' in m || 'refused' in m;
    };
    let done = await lines.next();
    while (!done.done && notOutcome(done.value as string)) done = await lines.next();
    const rx = JSON.parse(done.value as string) as {
      guest_pid?: number;
      error?: unknown;
      received?: { postcopy?: Record<string, number> };
      cpu_s?: { user: number; system: number };
    };
    if (!rx.guest_pid) throw new LivemigError('ERR_LIVEMIG_GUEST', `the receiver did not start the guest: ${JSON.stringify(rx)}`, { phase: 'demo' });
    destPid = rx.guest_pid;
    dest = processRef(destPid);
    const verify = await observer.waitFor((b) => b.pid === destPid && b.verify !== undefined, 120_000);
    await new Promise((r) => setTimeout(r, 100)); // a few more heartbeats after the check
    const tEnd = monotonicMs();
    // a naive stop-and-copy pauses before the handshake: its whole run is the guest's gap
    const migrating = naive || tMigrating === undefined ? tStart : tMigrating;
    const gap = observer.maxGap(migrating, tEnd);
    const prepGap = migrating > tStart ? observer.maxGap(tStart, migrating) : 0;
    // the beats either side of the pause, the source's last and the destination's first
    const felt = !naive && tPaused !== undefined ? observer.gapAcross(tPaused) : undefined;
    const diskCheck = verify.verify!.disk;
    if (disk && !diskCheck) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the destination guest did not check its disk', { phase: 'demo' });
    return {
      ...report,
      verified: report.verified && verify.verify!.bad === 0 && (diskCheck?.bad ?? 0) === 0,
      guest_gap_ms: +gap.toFixed(3),
      guest_gap_preparation_ms: +prepGap.toFixed(3),
      ...(felt !== undefined ? { guest_downtime_ms: +felt.toFixed(3) } : {}),
      guest_verified: {
        bad: verify.verify!.bad,
        first_bad: verify.verify!.firstBad,
        writes: verify.verify!.writes,
        verify_ms: +verify.verify!.ms.toFixed(0),
        ...(diskCheck ? { disk: { bad: diskCheck.bad, first_bad: diskCheck.firstBad, writes: diskCheck.writes, blocks: diskCheck.blocks } } : {}),
      },
      ...(rx.received?.postcopy ? { destination_postcopy: rx.received.postcopy } : {}),
      // the C example guest has its own content (docs/GUEST.md), written uniformly
      content: kind === 'c' ? 'c-example' : g.content,
      rate_mib_s: g.rate,
      pattern: kind === 'c' ? 'uniform' : g.pattern,
      cpu_s: { source: +((cpu.user + cpu.system) / 1e6).toFixed(3), destination: rx.cpu_s ? +(rx.cpu_s.user + rx.cpu_s.system).toFixed(3) : Number.NaN },
      source_memory: { held_before_bytes: heldBefore * PAGE_SIZE, held_at_release_bytes: heldAtRelease * PAGE_SIZE },
    };
  } finally {
    if (dest) signalProcess(dest, 'SIGTERM');
    if (guest && guest.child.exitCode === null) guest.kill();
    if (receiver.exitCode === null) {
      const exited = once(receiver, 'exit');
      receiver.kill();
      await exited;
    }
    observer.close();
    secure?.remove();
    if (diskDir && !o.diskDir) rmSync(diskDir, { recursive: true, force: true });
    // Wait until the destination guest is gone too: tearing down a gigabyte it mapped would
    // otherwise run beside whatever comes next (a benchmark's next run).
    for (let i = 0; dest && i < 500 && isSameProcess(dest); i++) await new Promise((r) => setTimeout(r, 10));
    if (dest) signalProcess(dest, 'SIGKILL'); // a demo leaves no guest behind
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

/**
 * The demo's credentials: a fresh test CA with certificates for 'src' (this side) and 'dst'
 * (the receiver, which reads its files from a private temporary directory).
 */
function secureDemo(): { receiverArgs: string[]; credentials: Credentials; remove(): void } {
  const ca = makeTestCa(['src', 'dst'], 1);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-demo-ca-'));
  try {
    writeTestCa(dir, { ...ca, certs: { dst: ca.certs['dst']! } });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  const f = (n: string): string => path.join(dir, n);
  return {
    receiverArgs: ['--tls-cert', f('dst.crt'), '--tls-key', f('dst.key'), '--tls-ca', f('ca.crt'), '--allow', 'src'],
    credentials: { kind: 'cert', ...ca.certs['src']!, ca: ca.ca, peerName: 'dst' },
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

function withoutDisk(g: GuestSpec): Omit<GuestSpec, 'disk'> {
  const { disk: _disk, ...rest } = g;
  return rest;
}
