/**
 * `livemig demo --daemon`: the demo through the service path. Two `livemig serve` daemons on
 * loopback (their own processes), a reference guest that registers with the first, and the
 * migration asked for over the first daemon's HTTP API and followed by its events; the
 * destination guest then checks every page, as in the plain demo.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { LivemigError } from '../errors.js';
import { processRef, signalProcess, type ProcessRef } from '../process-ref.js';
import { followEvents, request, type ApiTarget, type StreamEvent } from '../daemon/client.js';
import { DaemonProcess } from '../daemon/process.js';
import type { MigrationReport } from '../source/types.js';
import { monotonicMs } from '../workload/clock.js';
import { HeartbeatObserver, referenceGuestRegisterArgs, type GuestOptions } from '../workload/controller.js';

export interface DaemonDemoReport extends MigrationReport {
  guest_gap_ms: number;
  guest_verified: { bad: number; writes: string };
  /** the migration as each daemon listed it */
  migration: { id: string; state: string };
  destination: { id: string; state: string };
  events: Record<string, number>;
  daemons: 'two livemig serve processes, unix-socket APIs, loopback migration port';
}

export async function runDaemonDemo(o: {
  guest: GuestOptions;
  downtimeLimitMs: number;
  mode?: 'precopy' | 'postcopy' | 'hybrid';
  onEvent?: (e: StreamEvent) => void;
}): Promise<DaemonDemoReport> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-demo-daemons-'));
  const observer = await HeartbeatObserver.start();
  const daemons: DaemonProcess[] = [];
  let guest: ProcessRef | undefined;
  let destPid = 0;
  let dest: ProcessRef | undefined;
  try {
    const src = await DaemonProcess.start({ dir: path.join(dir, 'source') });
    daemons.push(src);
    const dst = await DaemonProcess.start({ dir: path.join(dir, 'destination') });
    daemons.push(dst);
    const s: ApiTarget = { socketPath: src.socketPath };
    const d: ApiTarget = { socketPath: dst.socketPath };
    const argv = referenceGuestRegisterArgs(src.guests, 'demo-guest', { ...o.guest, heartbeat: observer.address });
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'inherit'] });
    guest = child.pid ? processRef(child.pid) : undefined;
    child.unref();
    await waitForGuest(s, 'demo-guest', child);
    await new Promise((r) => setTimeout(r, 300)); // let the guest's writes reach their rate
    const t0 = monotonicMs();
    const { body: created } = await request<{ id: string }>(s, 'POST', '/v1/migrations', {
      guest: 'demo-guest',
      to: { host: '127.0.0.1', port: dst.port },
      mode: o.mode ?? 'precopy',
      downtime_limit_ms: o.downtimeLimitMs,
    });
    const counts: Record<string, number> = {};
    let report: MigrationReport | undefined;
    let state = '';
    await followEvents(s, `/v1/migrations/${created.id}/events`, (e) => {
      counts[e.event] = (counts[e.event] ?? 0) + 1;
      o.onEvent?.(e);
      if (e.event === 'report') report = e.data['report'] as MigrationReport;
      if (e.event === 'state') state = String(e.data['state']);
      return state === 'completed' || state === 'failed' || state === 'cancelled';
    });
    if (state !== 'completed' || !report) {
      const { body } = await request<{ error?: { code: string; message: string } }>(s, 'GET', `/v1/migrations/${created.id}`);
      throw new LivemigError(
        (body.error?.code as 'ERR_LIVEMIG_ABORTED') ?? 'ERR_LIVEMIG_ABORTED',
        `the migration ${state}: ${body.error?.message ?? 'no report'}`,
        { phase: 'demo' },
      );
    }
    const { body: incoming } = await request<{ migrations: { id: string; state: string; guest_pid?: number }[] }>(
      d,
      'GET',
      '/v1/migrations?direction=incoming',
    );
    const there = incoming.migrations.find((m) => m.state === 'completed');
    if (!there?.guest_pid)
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the destination daemon lists no completed incoming migration: ${JSON.stringify(incoming)}`, {
        phase: 'demo',
      });
    destPid = there.guest_pid;
    dest = processRef(destPid);
    const verify = await observer.waitFor((b) => b.pid === destPid && b.verify !== undefined, 120_000);
    const gap = observer.maxGap(t0, monotonicMs());
    return {
      ...report,
      verified: report.verified && verify.verify!.bad === 0,
      guest_gap_ms: +gap.toFixed(3),
      guest_verified: { bad: verify.verify!.bad, writes: verify.verify!.writes },
      migration: { id: created.id, state },
      destination: { id: there.id, state: there.state },
      events: counts,
      daemons: 'two livemig serve processes, unix-socket APIs, loopback migration port',
    };
  } finally {
    // (the source guest exits once it runs at the destination: its pid may name another process by now)
    for (const ref of [dest, guest]) if (ref) signalProcess(ref, 'SIGTERM');
    await Promise.all(daemons.map((x) => x.stop()));
    observer.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function waitForGuest(t: ApiTarget, name: string, child: { exitCode: number | null }, timeoutMs = 120_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const { body } = await request<{ guests: { name: string }[] }>(t, 'GET', '/v1/guests');
    if (body.guests.some((g) => g.name === name)) return;
    if (child.exitCode !== null) throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest exited (${child.exitCode}) before it registered`, { phase: 'demo' });
    if (Date.now() > until) throw new LivemigError('ERR_LIVEMIG_TIMEOUT', `guest ${name} did not register within ${timeoutMs} ms`, { phase: 'demo' });
    await new Promise((r) => setTimeout(r, 50));
  }
}
