/**
 * `livemig demo --qemu`: a small Linux VM (contrib/qemu-guest, QEMU in TCG) migrated live by
 * livemig on loopback: `livemig receive --qemu-exec` and `livemig send --qemu`, each its own
 * process, as an operator runs them. The VM's workload beats on its serial port every
 * millisecond and, at the destination, checks every page it wrote; the report gives the
 * guest-observed gap (host clock, both ports as one stream) beside livemig's own figures.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LivemigError } from '../errors.js';
import { processRef, signalProcess, type ProcessRef } from '../process-ref.js';
import { QEMU, Serial, SourceVm, qemuUnavailable, type VmOptions } from './qemu-vm.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../cli/main.js');
const CLK_TCK = 100;

/** CPU seconds a process has used so far (utime + stime of every thread) */
export function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/** The longest silence between beats from `t0` on (performance.now()), two ports as one stream (ms). */
export function longestGap(a: Serial, b: Serial, t0: number): { gap: number; at: number } {
  const beats = [...a.beats, ...b.beats].filter((x) => x.at >= t0).sort((x, y) => x.at - y.at);
  let gap = 0;
  let at = 0;
  for (let k = 1; k < beats.length; k++) {
    const d = beats[k]!.at - beats[k - 1]!.at;
    if (d > gap) {
      gap = d;
      at = beats[k - 1]!.at - t0;
    }
  }
  return { gap: +gap.toFixed(2), at: +at.toFixed(1) };
}

export interface LivemigQemuRun {
  ok: boolean;
  /** send's JSON line (its report, or {error, source_guest}) */
  report: Record<string, unknown>;
  /** receive's outcome line */
  received: Record<string, unknown>;
  /** the destination VM's ttyS1, read from its start */
  destination: Serial;
  /** the destination QEMU (pid and start time: a late kill must not hit a pid reused meanwhile) */
  destinationQemu?: ProcessRef;
  /** CPU seconds: the source QEMU over the migration plus send; the destination QEMU plus receive */
  cpu_source_s: number;
  cpu_destination_s: number;
}

type Json = Record<string, unknown>;

/** `livemig receive --qemu-exec LINE` on a free loopback port, its JSON lines as they come. */
export interface QemuReceiver {
  child: ChildProcess;
  port: number;
  lines: Json[];
  /** the first line with `key` (waits for it; rejects when the receiver exits without one) */
  next(key: string): Promise<Json>;
}

/** how a livemig process is started besides its arguments: Node's own flags (e.g. `--import` of a hook) and its environment */
export interface SpawnWith {
  nodeArgs?: readonly string[];
  env?: NodeJS.ProcessEnv;
}

/** `extra`: more of receive's flags (e.g. --disk-dir DIR) */
export async function qemuReceiver(line: string, w: SpawnWith = {}, extra: readonly string[] = []): Promise<QemuReceiver> {
  const child = spawn(process.execPath, [...(w.nodeArgs ?? []), CLI, 'receive', '--listen', '127.0.0.1:0', '--linger', '0', '--qemu-exec', line, ...extra], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: w.env ?? process.env,
  });
  const lines: Json[] = [];
  const waiters: (() => void)[] = [];
  createInterface({ input: child.stdout! }).on('line', (l) => {
    lines.push(JSON.parse(l) as Json);
    for (const w of waiters.splice(0)) w();
  });
  const next = async (key: string): Promise<Json> => {
    for (;;) {
      const hit = lines.find((l) => key in l);
      if (hit) return hit;
      if (child.exitCode !== null)
        throw new LivemigError('ERR_LIVEMIG_ABORTED', `the receiver exited (${child.exitCode}) with no ${key} line: ${JSON.stringify(lines)}`);
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 200);
      });
    }
  };
  try {
    return { child, port: (await next('listening'))['port'] as number, lines, next };
  } catch (e) {
    child.kill();
    throw e;
  }
}

/** `livemig send --qemu QMP --to 127.0.0.1:PORT --json`: its exit code and last JSON line. */
export function qemuSender(
  qmp: string,
  port: number,
  extra: readonly string[] = [],
  w: SpawnWith = {},
): { child: ChildProcess; done: Promise<{ code: number; out: Json }> } {
  const child = spawn(process.execPath, [...(w.nodeArgs ?? []), CLI, 'send', '--qemu', qmp, '--to', `127.0.0.1:${port}`, '--json', ...extra], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: w.env ?? process.env,
  });
  let text = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (text += s));
  const done = new Promise<{ code: number; out: Json }>((resolve) =>
    child.once('exit', (code) => resolve({ code: code ?? -1, out: JSON.parse(text.trim().split('\n').pop() || '{}') as Json })),
  );
  return { child, done };
}

/**
 * Migrates `vm` with `livemig receive --qemu-exec` and `livemig send --qemu` on loopback;
 * `prealloc`: the destination's backend maps its RAM when QEMU starts (docs/QEMU.md).
 */
export async function migrateWithLivemig(vm: SourceVm, o: { prealloc?: boolean; sendArgs?: string[] } = {}): Promise<LivemigQemuRun> {
  const to = vm.destination({ ...vm.options, preload: false, prealloc: o.prealloc ?? true });
  const rx = await qemuReceiver(to.line);
  try {
    const cpu0 = cpuSeconds(vm.child.pid!);
    const tx = qemuSender(vm.qmp, rx.port, o.sendArgs);
    const destination = new Serial();
    // the destination QEMU serves its port from its start: heard from its first beat
    const heard = rx.next('receiving').then(() => destination.attach(to.serial));
    heard.catch(() => undefined);
    // the source QEMU's CPU until it quits: sampled while it lives
    let sourceCpu = 0;
    const sampler = setInterval(() => {
      try {
        sourceCpu = cpuSeconds(vm.child.pid!) - cpu0;
      } catch {
        clearInterval(sampler); // it quit: the last sample stands
      }
    }, 2);
    const { code, out: report } = await tx.done;
    clearInterval(sampler);
    if (code !== 0) return { ok: false, report, received: {}, destination, cpu_source_s: 0, cpu_destination_s: 0 };
    await heard;
    const received = await rx.next('received');
    const cpu = (c: unknown): number => (c ? (c as { user: number; system: number }).user + (c as { system: number }).system : 0);
    const pid = (received['guest_pid'] as number | undefined) ?? 0;
    return {
      ok: true,
      report,
      received,
      destination,
      ...(pid ? { destinationQemu: processRef(pid) } : {}),
      cpu_source_s: +(sourceCpu + cpu(report['cpu_s'])).toFixed(2),
      cpu_destination_s: +((pid ? cpuSeconds(pid) : 0) + cpu(received['cpu_s'])).toFixed(2),
    };
  } finally {
    if (rx.child.exitCode === null) rx.child.kill();
  }
}

export interface QemuDemoReport {
  verified: boolean;
  qemu: string;
  vm: { mem_mib: number; write_mib: number; rate_mib_s: number };
  tracker: string;
  tracker_reason: string;
  rounds: number;
  total_ms: number;
  downtime_ms: number;
  guest_gap_ms: number;
  wire_bytes: number;
  stop_and_copy: Record<string, number>;
  guest_check: { pages: number; bad: number; firstBad: number };
  destination_pid: number;
}

/** Boots the test VM, migrates it live, checks it at the destination, and stops it. */
export async function runQemuDemo(o: VmOptions = {}): Promise<QemuDemoReport> {
  const why = qemuUnavailable();
  if (why) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `demo --qemu: ${why}`, { phase: 'validate' });
  const vm = await SourceVm.boot({ memMiB: 512, writeMiB: 128, rate: 64, hbMs: 1, preload: true, ...o });
  let run: LivemigQemuRun | undefined;
  try {
    await new Promise((r) => setTimeout(r, 500)); // writing steadily
    const t0 = performance.now();
    run = await migrateWithLivemig(vm);
    if (!run.ok) throw new LivemigError('ERR_LIVEMIG_ABORTED', `the migration failed: ${JSON.stringify(run.report['error'] ?? run.report)}`);
    await run.destination.beatsAfter(vm.serial.lastSeq + 20);
    const check = await run.destination.check();
    const r = run.report;
    return {
      verified: r['verified'] === true && check.bad === 0,
      qemu: vm.options.binary?.path ?? QEMU,
      vm: { mem_mib: vm.options.memMiB ?? 256, write_mib: vm.options.writeMiB ?? 64, rate_mib_s: vm.options.rate ?? 16 },
      tracker: String(r['tracker']),
      tracker_reason: String(r['tracker_reason']),
      rounds: Number(r['rounds']),
      total_ms: +(Number(r['prep_ms'] ?? 0) + Number(r['total_ms'] ?? 0)).toFixed(1),
      downtime_ms: Number(r['downtime_ms']),
      guest_gap_ms: longestGap(vm.serial, run.destination, t0).gap,
      wire_bytes: Number(r['wire_bytes']),
      stop_and_copy: r['stop_and_copy'] as Record<string, number>,
      guest_check: check,
      destination_pid: run.destinationQemu?.pid ?? 0,
    };
  } finally {
    run?.destination.close();
    if (run?.destinationQemu) signalProcess(run.destinationQemu, 'SIGKILL');
    vm.cleanup();
  }
}
