import { once } from 'node:events';
/** The `livemig` subcommands: receive, send, demo. */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { LivemigError } from '../errors.js';
import { migrate } from '../source/migrate.js';
import type { MigrateOptions, MigrationReport, ProgressEvent } from '../source/types.js';
import { listen } from '../receiver/listen.js';
import { CONTENTS, PATTERNS } from '../workload/content.js';
import { monotonicMs } from '../workload/clock.js';
import { HeartbeatObserver, IncomingGuest, SourceGuest } from '../workload/controller.js';
import { parseHostPort, parseNumber, parseSize } from './units.js';

const GUEST_FLAGS = {
  size: { type: 'string', default: '1GiB' },
  content: { type: 'string', default: 'mixed' },
  rate: { type: 'string', default: '64' },
  pattern: { type: 'string', default: 'uniform' },
  'hot-size': { type: 'string', default: '64MiB' },
  'downtime-limit': { type: 'string', default: '50' },
  'max-rounds': { type: 'string', default: '30' },
  json: { type: 'boolean', default: false },
  'no-zero': { type: 'boolean', default: false },
  'no-dedup': { type: 'boolean', default: false },
  'no-compress': { type: 'boolean', default: false },
  'on-stall': { type: 'string' },
  bandwidth: { type: 'string' },
  deadline: { type: 'string' },
  'no-wws': { type: 'boolean', default: false },
  'rate-adapt': { type: 'string' },
  'max-bytes': { type: 'string' },
  mode: { type: 'string' },
} as const;

/** The convergence settings given on the command line (see MigrateOptions). */
export type PolicyFlags = Pick<MigrateOptions, 'onStall' | 'bandwidthMiBps' | 'deadlineMs' | 'wws' | 'rateAdaptation' | 'maxBytes' | 'mode'>;

function policyOptions(v: Record<string, string | boolean | undefined>): PolicyFlags {
  const o: PolicyFlags = {};
  const stall = v['on-stall'];
  if (typeof stall === 'string') {
    if (!['throttle', 'postcopy', 'force', 'abort'].includes(stall)) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `--on-stall must be throttle, postcopy, force or abort, got ${stall}`);
    o.onStall = stall as PolicyFlags['onStall'];
  }
  if (typeof v.bandwidth === 'string') o.bandwidthMiBps = parseNumber(v.bandwidth, '--bandwidth (MiB/s)', Number.MIN_VALUE);
  if (typeof v.deadline === 'string') o.deadlineMs = parseNumber(v.deadline, '--deadline (seconds)', Number.MIN_VALUE) * 1000;
  if (v['no-wws']) o.wws = false;
  if (typeof v['rate-adapt'] === 'string') {
    const [a, b] = v['rate-adapt'].split(':');
    o.rateAdaptation = { startMiBps: parseNumber(a ?? '', '--rate-adapt START', Number.MIN_VALUE), incrementMiBps: parseNumber(b ?? '50', '--rate-adapt INCREMENT') };
  }
  if (typeof v['max-bytes'] === 'string') o.maxBytes = parseSize(v['max-bytes'], '--max-bytes');
  if (typeof v.mode === 'string') {
    if (!['precopy', 'postcopy', 'hybrid'].includes(v.mode)) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `--mode must be precopy, postcopy or hybrid, got ${v.mode}`);
    o.mode = v.mode as PolicyFlags['mode'];
  }
  return o;
}

function encodingOptions(v: Record<string, string | boolean | undefined>): { zero: boolean; dedup: boolean; compress: boolean } {
  return { zero: !v['no-zero'], dedup: !v['no-dedup'], compress: !v['no-compress'] };
}

function guestOptions(v: Record<string, string | boolean | undefined>) {
  const content = v.content as string;
  const pattern = v.pattern as string;
  if (!(CONTENTS as readonly string[]).includes(content)) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `--content must be one of ${CONTENTS.join(', ')}`);
  if (!(PATTERNS as readonly string[]).includes(pattern)) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `--pattern must be one of ${PATTERNS.join(', ')}`);
  const size = parseSize(v.size as string, '--size');
  if (size % 4096 !== 0) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', '--size must be a multiple of 4 KiB');
  return { size, content, pattern, rate: parseNumber(v.rate as string, '--rate'), hotSize: parseSize(v['hot-size'] as string, '--hot-size') };
}

function printRound(e: ProgressEvent): void {
  if (e.type === 'round') {
    process.stderr.write(`  round ${String(e.round).padStart(2)}: ${String(e.pages).padStart(7)} pages ${(e.bytes / 2 ** 20).toFixed(1).padStart(8)} MiB in ${e.duration_ms.toFixed(1).padStart(7)} ms (${e.mbps.toFixed(0)} MB/s); ${e.dirty_pages} dirty, ${e.wws_pages} held, est. ${e.expected_downtime_ms.toFixed(1)} ms${e.cpu_throttle_percentage ? `, throttle ${e.cpu_throttle_percentage}%` : ''} -> ${e.decision}\n`);
  } else if (e.type === 'handshake') {
    process.stderr.write(`  handshake + reservation: ${e.prep_ms.toFixed(0)} ms; tracking: ${e.tracker}\n`);
  }
}

/** livemig receive --listen HOST:PORT: serves one migration; the reference guest resumes here. */
export async function receiveCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { listen: { type: 'string', default: '127.0.0.1:7878' }, 'max-region': { type: 'string' }, 'reuse-image': { type: 'string' }, json: { type: 'boolean', default: false } } });
  const { host, port } = parseHostPort(values.listen, '--listen');
  let guestPid = 0;
  let incoming: IncomingGuest | undefined;
  const rx = await listen(host, port, {
    ...(values['max-region'] ? { maxRegionBytes: parseSize(values['max-region'], '--max-region') } : {}),
    ...(values['reuse-image'] ? { reuseImage: values['reuse-image'] } : {}),
    onReserved: async (region, postcopy) => {
      incoming = new IncomingGuest(region, postcopy === 'planned' ? 'planned' : 'possible');
      await incoming.ready; // the guest maps its memory before pages flow, not during
    },
    postcopy: { register: () => incoming!.register() },
    onDiscard: () => incoming?.kill(),
    prepare: (_region, deviceState) => incoming!.prepare(deviceState),
    activate: async (_region, deviceState) => {
      await incoming!.activate(deviceState);
      guestPid = incoming!.child.pid ?? 0;
    },
  });
  process.stdout.write(JSON.stringify({ listening: `${rx.address}:${rx.port}`, port: rx.port }) + '\n');
  try {
    const report = await rx.next();
    if (report.mode === 'postcopy') await incoming!.verify();
    process.stdout.write(JSON.stringify({ received: report, guest_pid: guestPid || incoming?.child.pid || 0 }) + '\n');
    return 0;
  } catch (e) {
    const err = e as LivemigError;
    process.stdout.write(JSON.stringify({ error: { code: err.code, phase: err.phase, message: err.message } }) + '\n');
    return 1;
  } finally {
    await rx.close();
  }
}

/** livemig send --to HOST:PORT: starts a reference guest here and migrates it live. */
export async function sendCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { to: { type: 'string' }, heartbeat: { type: 'string' }, ...GUEST_FLAGS } });
  if (!values.to) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'send needs --to HOST:PORT');
  const to = parseHostPort(values.to, '--to');
  const g = guestOptions(values);
  const guest = await SourceGuest.spawn({ ...g, ...(values.heartbeat ? { heartbeat: values.heartbeat } : {}) });
  try {
    const report = await migrate({
      region: guest.region,
      ...(guest.target ? { target: guest.target } : {}),
      to,
      pause: () => guest.pause(),
      resume: () => guest.resume(),
      release: () => guest.exit(),
      downtimeLimitMs: parseNumber(values['downtime-limit'], '--downtime-limit'),
      maxRounds: parseNumber(values['max-rounds'], '--max-rounds', 1),
      encodings: encodingOptions(values),
      throttle: (p) => guest.throttle(p),
      ...policyOptions(values),
      onProgress: values.json ? undefined : printRound,
    });
    process.stdout.write(JSON.stringify(report) + '\n');
    return 0;
  } catch (e) {
    guest.kill();
    throw e;
  }
}

const CLI_ENTRY = fileURLToPath(new URL('./main.js', import.meta.url));

export interface DemoReport extends MigrationReport {
  /** largest heartbeat gap from the first page sent (the window of total_ms) to after the check */
  guest_gap_ms: number;
  /**
   * largest heartbeat gap during the handshake and the destination's reservation. Reported apart:
   * here the destination shares the source's VM, whose first touch of fresh memory stalls it at
   * the host level (bench/RESULTS.md); across two hosts it cannot reach the guest.
   */
  guest_gap_preparation_ms: number;
  guest_verified: { bad: number; first_bad: number; writes: string; verify_ms: number };
  /** the destination's post-copy figures: faults, latency percentiles, pages pulled and pushed */
  destination_postcopy?: Record<string, number>;
  content: string;
  rate_mib_s: number;
  pattern: string;
}

/** Runs receiver, guest and sender on loopback and migrates the guest live. */
export async function runDemo(
  g: ReturnType<typeof guestOptions>,
  downtimeLimitMs: number,
  maxRounds: number,
  onProgress?: (e: ProgressEvent) => void,
  /** naive stop-and-copy baseline: pause first, send everything once, then resume there */
  naive = false,
  encodings: { zero: boolean; dedup: boolean; compress: boolean } = { zero: true, dedup: true, compress: true },
  receiverArgs: string[] = [],
  /** where the receiver runs: a command prefix (e.g. `ip netns exec NAME`) and the address it listens on */
  receiverAt: { prefix: string[]; host: string; observer?: string } = { prefix: [], host: '127.0.0.1' },
  policy: PolicyFlags = {},
): Promise<DemoReport> {
  // heartbeats from both guests must reach the observer: across a namespace link, on its near end
  const observer = await HeartbeatObserver.start(receiverAt.observer);
  const rxCommand = [...receiverAt.prefix, process.execPath, CLI_ENTRY, 'receive', '--listen', `${receiverAt.host}:0`, ...receiverArgs];
  const receiver = spawn(rxCommand[0]!, rxCommand.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]();
  let guest: SourceGuest | undefined;
  let destPid = 0;
  try {
    const first = await lines.next();
    if (first.done) throw new LivemigError('ERR_LIVEMIG_CONNECTION', 'the receiver exited before listening', { phase: 'demo' });
    const { port } = JSON.parse(first.value) as { port: number };
    guest = await SourceGuest.spawn({ ...g, heartbeat: observer.address });
    await new Promise((r) => setTimeout(r, 300)); // let the guest's writes reach their rate
    const tStart = monotonicMs();
    let tMigrating: number | undefined;
    const progress = (e: ProgressEvent): void => {
      if (e.type === 'handshake') tMigrating = monotonicMs();
      onProgress?.(e);
    };
    const source = guest;
    const early = naive ? await source.pause() : undefined;
    const report = await migrate({
      region: source.region,
      ...(source.target ? { target: source.target } : {}),
      to: { host: receiverAt.host, port },
      pause: early ? async () => early : () => source.pause(),
      resume: () => source.resume(),
      release: () => source.exit(),
      downtimeLimitMs: naive ? Number.MAX_SAFE_INTEGER : downtimeLimitMs,
      maxRounds: naive ? 1 : maxRounds,
      encodings: naive ? { zero: false, dedup: false, compress: false } : encodings,
      throttle: (p) => source.throttle(p),
      ...(naive ? { wws: false } : policy),
      onProgress: progress,
    });
    if (early) report.downtime_ms = +(report.prep_ms + report.total_ms).toFixed(3); // paused from before the handshake to activation
    const done = await lines.next();
    const rx = JSON.parse(done.value as string) as { guest_pid?: number; error?: unknown; received?: { postcopy?: Record<string, number> } };
    if (!rx.guest_pid) throw new LivemigError('ERR_LIVEMIG_GUEST', `the receiver did not start the guest: ${JSON.stringify(rx)}`, { phase: 'demo' });
    destPid = rx.guest_pid;
    const verify = await observer.waitFor((b) => b.pid === destPid && b.verify !== undefined, 120_000);
    await new Promise((r) => setTimeout(r, 100)); // a few more heartbeats after the check
    const tEnd = monotonicMs();
    // a naive stop-and-copy pauses before the handshake: its whole run is the guest's gap
    const migrating = naive || tMigrating === undefined ? tStart : tMigrating;
    const gap = observer.maxGap(migrating, tEnd);
    const prepGap = migrating > tStart ? observer.maxGap(tStart, migrating) : 0;
    return {
      ...report,
      verified: report.verified && verify.verify!.bad === 0,
      guest_gap_ms: +gap.toFixed(3),
      guest_gap_preparation_ms: +prepGap.toFixed(3),
      guest_verified: { bad: verify.verify!.bad, first_bad: verify.verify!.firstBad, writes: verify.verify!.writes, verify_ms: +verify.verify!.ms.toFixed(0) },
      ...(rx.received?.postcopy ? { destination_postcopy: rx.received.postcopy } : {}),
      content: g.content,
      rate_mib_s: g.rate,
      pattern: g.pattern,
    };
  } finally {
    if (destPid) {
      try {
        process.kill(destPid, 'SIGTERM');
      } catch {
        // already gone
      }
    }
    if (guest && guest.child.exitCode === null) guest.kill();
    if (receiver.exitCode === null) {
      const exited = once(receiver, 'exit');
      receiver.kill();
      await exited;
    }
    observer.close();
    // Wait until the destination guest is gone too: tearing down a gigabyte it mapped would
    // otherwise run beside whatever comes next (a benchmark's next run).
    for (let i = 0; destPid && i < 500 && alive(destPid); i++) await new Promise((r) => setTimeout(r, 10));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false; // ESRCH: gone
  }
}

export async function demoCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: GUEST_FLAGS });
  const g = guestOptions(values);
  const downtime = parseNumber(values['downtime-limit'], '--downtime-limit');
  if (!values.json) process.stderr.write(`livemig demo: ${(g.size / 2 ** 20).toFixed(0)} MiB ${g.content} guest writing ${g.rate} MiB/s ${g.pattern}, loopback\n`);
  const r = await runDemo(g, downtime, parseNumber(values['max-rounds'], '--max-rounds', 1), values.json ? undefined : printRound, false, encodingOptions(values), [], undefined, policyOptions(values));
  if (values.json) {
    process.stdout.write(JSON.stringify(r) + '\n');
  } else {
    const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;
    process.stdout.write(
      [
        `verified: ${r.verified ? 'yes' : 'NO'} (digest ${r.digest}; guest checked every page: ${r.guest_verified.bad} wrong after ${r.guest_verified.writes} writes)`,
        r.postcopy
          ? `mode: ${r.mode}; ${r.rounds} pre-copy rounds, then post-copy of ${r.postcopy.pages_needed} pages (${r.postcopy.pages_pushed} pushed, ${r.postcopy.pages_served} on request; ${r.postcopy.reconnects} reconnections)`
          : `rounds: ${r.rounds}, then stop-and-copy of ${r.stop_and_copy.pages} pages`,
        ...(r.destination_postcopy
          ? [`faults at the destination: ${r.destination_postcopy.faults}, latency p50 ${r.destination_postcopy.fault_latency_p50_us} us, p99 ${r.destination_postcopy.fault_latency_p99_us} us; guest blocked ${r.destination_postcopy.blocked_ms} ms in total`]
          : []),
        `preparation (handshake + reservation): ${r.prep_ms.toFixed(0)} ms`,
        r.postcopy ? `total time (first page to the destination holding every page): ${r.total_ms.toFixed(0)} ms` : `total time (first page to activation): ${r.total_ms.toFixed(0)} ms`,
        `downtime (pause to activation): ${r.downtime_ms.toFixed(2)} ms`,
        `downtime as the guest saw it (largest heartbeat gap from the first page on): ${r.guest_gap_ms.toFixed(2)} ms (during preparation: ${r.guest_gap_preparation_ms.toFixed(2)} ms)`,
        `bytes on the wire: ${mib(r.wire_bytes)} for a ${mib(r.region_bytes)} region (${r.pages_sent} pages sent)`,
        `encodings: ${r.encodings ? `${r.zero_pages} zero, ${r.dup_pages} dup, ${r.lz4_pages} lz4 (ratio ${r.lz4_ratio}), ${r.raw_pages} raw, ${r.skipped_pages} already there` : 'off'}`,
      ].join('\n') + '\n',
    );
  }
  return r.verified ? 0 : 1;
}
