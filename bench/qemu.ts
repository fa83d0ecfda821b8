/**
 * bench/qemu: the same QEMU VM (TCG) migrated by QEMU itself and by livemig, in the same run
 * (issue 34, item 7). The VM's memwriter rewrites a region of its RAM at a set rate and beats
 * on ttyS1 every millisecond; the guest-observed gap is the longest silence between two beats
 * around the migration, on the host's clock, the source's port and the destination's read as
 * one stream. After each migration the VM checks every page it wrote.
 *
 *   node dist/bench/qemu.js [--runs 2] [--mem 1024] [--write 256] [--rates 0,64,256,512]
 *        [--modes qemu-default,qemu-dl30,qemu-multifd2,livemig-hash,livemig-preload]
 *        [--qemu /opt/qemu-10/usr/bin/qemu-system-x86_64] [--qemu-args '-L DIR -L DIR -audio none']
 *
 * QEMU's own migration: over TCP on loopback to a destination started with `-incoming defer`;
 * default settings (downtime limit 300 ms), `qemu-dl30` (downtime-limit 30 and auto-converge),
 * `qemu-multifd2` (the same with multifd, 2 channels). livemig: `send --qemu` / `receive
 * --qemu-exec`, downtime limit 30 ms (or --livemig-downtime MS; a mode's suffix `-dlN` sets it
 * for that mode alone: `livemig-preload-dl10`), tracking by hashing or through the preload library.
 * Each line: gap, total time (QEMU's total-time; livemig's prep + total), bytes on the wire,
 * CPU seconds of each side (QEMU's process over the migration, plus livemig's processes).
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { cpuSeconds, longestGap, migrateWithLivemig } from '../src/demo/qemu-demo.js';
import { Serial, SourceVm, type VmOptions } from '../src/demo/qemu-vm.js';
import { processRef, signalProcess, type ProcessRef } from '../src/process-ref.js';
import { QmpClient } from '../src/vmm/qemu/qmp.js';
import { emit, machine } from './common.js';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : fallback;
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

interface Outcome {
  ok: boolean;
  reason?: string;
  total_ms: number;
  wire_bytes: number;
  downtime_ms: number;
  cpu_source_s: number;
  cpu_destination_s: number;
  destination: Serial;
  destinationQemu?: ProcessRef;
  extra?: Record<string, unknown>;
}

const CONVERGE_MS = 60_000;

async function qemuOwn(vm: SourceVm, mode: string): Promise<Outcome> {
  const port = await freePort();
  const dst = vm.startDestination(['-incoming', 'defer']);
  const destination = new Serial();
  await destination.attach(dst.serial);
  const dq = await connectRetry(dst.qmp);
  const sq = await QmpClient.connect(vm.qmp);
  try {
    const caps = [{ capability: 'events', state: true }];
    if (mode !== 'qemu-default') caps.push({ capability: 'auto-converge', state: true });
    if (mode === 'qemu-multifd2') caps.push({ capability: 'multifd', state: true });
    for (const q of [sq, dq]) {
      await q.execute('migrate-set-capabilities', { capabilities: caps });
      if (mode === 'qemu-multifd2') await q.execute('migrate-set-parameters', { 'multifd-channels': 2 });
    }
    if (mode !== 'qemu-default') await sq.execute('migrate-set-parameters', { 'downtime-limit': 30 });
    await dq.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
    // a migration that does not converge in a minute is given up (QEMU's default never throttles)
    const resumed = dq.waitEvent('RESUME', { timeoutMs: CONVERGE_MS });
    const completed = sq.waitEvent('MIGRATION', {
      accept: (e) => e.data?.['status'] === 'completed',
      fail: (e) => (e.data?.['status'] === 'failed' ? 'failed' : undefined),
      timeoutMs: CONVERGE_MS,
    });
    resumed.catch(() => undefined);
    completed.catch(() => undefined);
    const cpu0 = cpuSeconds(vm.child.pid!);
    const dcpu0 = cpuSeconds(dst.child.pid!);
    await sq.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
    let ok = true;
    let reason: string | undefined;
    try {
      await Promise.all([completed, resumed]);
    } catch (e) {
      ok = false;
      reason = `did not converge within ${CONVERGE_MS / 1000} s: ${(e as Error).message}`;
      await sq.execute('migrate_cancel').catch(() => undefined);
    }
    const q = await sq.execute<{ 'total-time'?: number; downtime?: number; ram?: { transferred: number }; 'error-desc'?: string }>('query-migrate');
    const out: Outcome = {
      ok,
      ...(reason ? { reason } : {}),
      total_ms: q['total-time'] ?? 0,
      wire_bytes: q.ram?.transferred ?? 0,
      downtime_ms: q.downtime ?? 0,
      cpu_source_s: +(cpuSeconds(vm.child.pid!) - cpu0).toFixed(2),
      cpu_destination_s: +(cpuSeconds(dst.child.pid!) - dcpu0).toFixed(2),
      destination,
      ...(dst.child.pid ? { destinationQemu: processRef(dst.child.pid) } : {}),
    };
    await sq.execute('quit').catch(() => undefined);
    return out;
  } finally {
    sq.close();
    dq.close();
  }
}

async function connectRetry(qmp: string): Promise<QmpClient> {
  for (let i = 0; ; i++) {
    try {
      if (existsSync(qmp)) return await QmpClient.connect(qmp);
    } catch (e) {
      if (i > 300) throw e;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** livemig's downtime limit for `mode`: its `-dlN` suffix (a sweep in one run), else --livemig-downtime, else 30 ms */
function livemigDowntime(mode: string): string {
  return /-dl(\d+)$/.exec(mode)?.[1] ?? arg('livemig-downtime', '30');
}

async function livemigRun(vm: SourceVm, prealloc: boolean, mode: string): Promise<Outcome> {
  const r = await migrateWithLivemig(vm, { prealloc, sendArgs: ['--downtime-limit', livemigDowntime(mode)] });
  const report = r.report;
  const sc = report['stop_and_copy'] as Record<string, number> | undefined;
  return {
    ok: r.ok,
    ...(r.ok ? {} : { reason: JSON.stringify(report['error'] ?? report).slice(0, 300) }),
    total_ms: +(((report['prep_ms'] as number) ?? 0) + ((report['total_ms'] as number) ?? 0)).toFixed(1),
    wire_bytes: (report['wire_bytes'] as number) ?? 0,
    downtime_ms: (report['downtime_ms'] as number) ?? 0,
    cpu_source_s: r.cpu_source_s,
    cpu_destination_s: r.cpu_destination_s,
    destination: r.destination,
    ...(r.destinationQemu ? { destinationQemu: r.destinationQemu } : {}),
    extra: { tracker: report['tracker'], rounds: report['rounds'], pause: sc, prep_ms: report['prep_ms'], migrate_ms: report['total_ms'] },
  };
}

async function main(): Promise<void> {
  const runs = Number(arg('runs', '2'));
  const mem = Number(arg('mem', '1024'));
  const write = Number(arg('write', '256'));
  const rates = arg('rates', '0,64,256,512').split(',').map(Number);
  const modes = arg('modes', 'qemu-default,qemu-dl30,qemu-multifd2,livemig-hash,livemig-preload').split(',');
  const q10 = '/opt/qemu-10/usr/bin/qemu-system-x86_64';
  const qemuPath = arg('qemu', existsSync(q10) ? q10 : 'qemu-system-x86_64');
  const qemuArgs = arg('qemu-args', qemuPath === q10 ? '-L /opt/qemu-10/usr/share/qemu -L /opt/qemu-10/usr/share/seabios -audio none' : '')
    .split(' ')
    .filter(Boolean);
  const binary = { path: qemuPath, args: qemuArgs };
  // livemig's destination QEMU with its backend's prealloc=on (QEMU maps and touches its RAM at start)
  const destPrealloc = process.argv.includes('--dest-prealloc');
  const version = await new Promise<string>((resolve) => {
    const p = spawn(qemuPath, ['--version']);
    let s = '';
    p.stdout.on('data', (b: Buffer) => (s += b.toString()));
    p.on('exit', () => resolve(s.split('\n')[0] ?? ''));
  });
  emit({ bench: 'qemu', kind: 'setup', machine: machine(), qemu: version, mem_mib: mem, write_mib: write, runs, rates, modes });
  for (let run = 1; run <= runs; run++) {
    for (const rate of rates) {
      // the modes in a different order each run: none always goes first on a fresh host
      const order = modes.map((m, i) => modes[(i + run - 1) % modes.length]!);
      for (const mode of order) {
        const o: VmOptions = { memMiB: mem, writeMiB: write, rate, hbMs: 1, preload: mode.startsWith('livemig-preload'), binary };
        const vm = await SourceVm.boot(o);
        let r: Outcome | undefined;
        try {
          await new Promise((res) => setTimeout(res, 1000)); // writing steadily
          const t0 = performance.now();
          r = mode.startsWith('qemu') ? await qemuOwn(vm, mode) : await livemigRun(vm, destPrealloc, mode);
          await r.destination.beatsAfter(vm.serial.lastSeq + 50, 30_000);
          const gap = longestGap(vm.serial, r.destination, t0);
          const check = r.ok ? await r.destination.check() : undefined;
          emit({
            bench: 'qemu',
            run,
            mode,
            rate_mib_s: rate,
            ok: r.ok,
            ...(r.reason ? { reason: r.reason } : {}),
            gap_ms: gap.gap,
            gap_at_ms: gap.at,
            total_ms: r.total_ms,
            downtime_ms: r.downtime_ms,
            wire_bytes: r.wire_bytes,
            cpu_source_s: r.cpu_source_s,
            cpu_destination_s: r.cpu_destination_s,
            check,
            ...(r.extra ?? {}),
          });
        } catch (e) {
          emit({ bench: 'qemu', run, mode, rate_mib_s: rate, ok: false, reason: (e as Error).message.slice(0, 300) });
        } finally {
          r?.destination.close();
          if (r?.destinationQemu) signalProcess(r.destinationQemu, 'SIGKILL');
          vm.cleanup();
        }
      }
    }
  }
}

await main();
