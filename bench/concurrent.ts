/**
 * bench/concurrent (issue 20, point 8; seed 001's table): N migrations at once of 256 MiB
 * reference guests (mixed content, each writing 64 MiB/s) between two `livemig serve` daemons,
 * driven over their HTTP APIs as an orchestrator would. For N = 1, 5, 10, 15 on loopback, and
 * a row through the 1 Gbit/s namespace link:
 *   the batch's total time (first POST to the last migration done), per-migration total time
 *   and downtime p50/p99, aggregate throughput against the single migration's (the baseline,
 *   measured in the same run), the destination's memory reserved at the peak, API latency
 *   p50/p99 (GET /v1/migrations every 20 ms during the batch), and every destination guest's
 *   own check of every page.
 *   node dist/bench/concurrent.js [--counts 1,5,10,15] [--size 256MiB] [--rate 64] [--link loopback|netns|both]
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { request, type ApiTarget } from '../src/daemon/client.js';
import { DaemonProcess } from '../src/daemon/process.js';
import type { MigrationReport } from '../src/source/types.js';
import { HeartbeatObserver, referenceGuestArgs, referenceGuestRegisterArgs, referenceIncomingCommand } from '../src/workload/controller.js';
import { parseSize } from '../src/cli/units.js';
import { setProcessNice } from '../src/sched.js';
import { emit, machine, nowMs } from './common.js';
import { createLink, type NetLink } from './netlink.js';

const { values } = parseArgs({
  options: {
    counts: { type: 'string', default: '1,5,10,15' },
    size: { type: 'string', default: '256MiB' },
    rate: { type: 'string', default: '64' },
    link: { type: 'string', default: 'both' },
    parallel: { type: 'string' },
    background: { type: 'string', default: '0' },
    pin: { type: 'boolean', default: false },
    'guest-nice': { type: 'string' },
    'daemon-nice': { type: 'string' },
  },
});
/** --guest-nice N: the guests (both ends) at nice N, the daemons at 0: what the CPUs left to the daemons decides */
const clientNice = process.getuid?.() === 0 ? -5 : 0;
const guestNice = values['guest-nice'] ? ['nice', '-n', values['guest-nice']] : [];
/** --daemon-nice N: both daemons at nice N (root may go below 0); their destination guests are set back to 0 */
const daemonNice = values['daemon-nice'] ? ['nice', '-n', values['daemon-nice']] : [];
/**
 * --pin: the guests on the last CPU, both daemons on the others (taskset): the engine gets the
 * same CPUs in every batch, as on a host whose guests have cores of their own
 */
const pin = values.pin === true;
const ncpu = os.availableParallelism();
const guestCpus = String(ncpu - 1);
const daemonCpus = ncpu > 2 ? `0-${ncpu - 2}` : '0';
const daemonArgs = values.parallel ? ['--parallel', values.parallel] : [];
/** guests that run beside the batch and are not migrated: a baseline under the same load */
const background = Number(values.background);
const counts = values.counts.split(',').map(Number);
const size = parseSize(values.size, '--size');
const rate = Number(values.rate);

const pct = (xs: number[], q: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))]! : NaN;
};

interface Row {
  link: string;
  background_guests: number;
  parallel: number | 'default';
  pinned: boolean;
  guest_nice: number;
  daemon_nice: number;
  client_nice: number;
  migrations: number;
  completed: number;
  verified: number;
  batch_s: number;
  total_ms_p50: number;
  total_ms_p99: number;
  /** handshake and reservation at the destination (its guest started, its memory mapped) */
  prep_ms_p50: number;
  prep_ms_p99: number;
  downtime_ms_p50: number;
  downtime_ms_p99: number;
  aggregate_mib_s: number;
  peak_reserved_mib: number;
  api_ms_p50: number;
  api_ms_p99: number;
  api_requests: number;
  /** of the host's CPUs, how many were busy during the batch (guests, daemons, kernel) */
  host_busy_cpus: number;
  errors: string[];
}

function cpuTimes(): { busy: number; total: number } {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  return { busy: total - f[3]! - f[4]!, total };
}

async function batch(n: number, link: NetLink | undefined): Promise<Row> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-bench-concurrent-'));
  const observer = await HeartbeatObserver.start(link?.near);
  const insecure = [...(link ? ['--insecure'] : []), ...daemonArgs];
  const taskset = [...(pin ? ['taskset', '-c', daemonCpus] : []), ...daemonNice];
  // nice -n is relative: a guest started by a daemon at -5 goes back to 0 with +5
  const destPrefix = [
    ...(pin ? ['taskset', '-c', guestCpus] : []),
    ...(guestNice.length ? guestNice : daemonNice.length ? ['nice', '-n', String(-Number(values['daemon-nice']))] : []),
  ];
  const destGuests = destPrefix.length ? ['--guest-exec', [...destPrefix, ...referenceIncomingCommand()].join(' ')] : [];
  const a = await DaemonProcess.start({ dir: path.join(dir, 'a'), ...(link ? { listen: `${link.near}:0` } : {}), args: insecure, prefix: taskset });
  const b = await DaemonProcess.start({
    dir: path.join(dir, 'b'),
    ...(link ? { listen: `${link.far}:0` } : {}),
    prefix: [...(link ? ['ip', 'netns', 'exec', link.ns] : []), ...taskset],
    args: [...insecure, ...destGuests],
  });
  const A: ApiTarget = { socketPath: a.socketPath };
  const B: ApiTarget = { socketPath: b.socketPath };
  const pids: number[] = [];
  try {
    // guests that only run here (the same load as a batch's, without migrating them)
    for (let i = 0; i < background; i++) {
      const argv = referenceGuestArgs(path.join(dir, `bg${i}.sock`), {
        size,
        content: 'mixed',
        rate,
        pattern: 'uniform',
        heartbeat: observer.address,
        seed: BigInt(1000 + i),
      });
      const [cmd, ...args] = [...(pin ? ['taskset', '-c', guestCpus] : []), ...guestNice, ...argv];
      pids.push(spawn(cmd!, args, { stdio: ['ignore', 'ignore', 'inherit'] }).pid!);
    }
    const names = Array.from({ length: n }, (_, i) => `g${i}`);
    for (const [i, name] of names.entries()) {
      const argv = referenceGuestRegisterArgs(a.guests, name, {
        size,
        content: 'mixed',
        rate,
        pattern: 'uniform',
        heartbeat: observer.address,
        seed: BigInt(i + 1),
      });
      const [cmd, ...args] = [...(pin ? ['taskset', '-c', guestCpus] : []), ...guestNice, ...argv];
      const child = spawn(cmd!, args, { stdio: ['ignore', 'ignore', 'inherit'] });
      pids.push(child.pid!);
    }
    for (;;) {
      const { body } = await request<{ guests: unknown[] }>(A, 'GET', '/v1/guests');
      if (body.guests.length === n) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    await new Promise((r) => setTimeout(r, 500)); // the guests write at their rate
    // API latency while the batch runs: what an orchestrator polling the daemon sees
    const api: number[] = [];
    let polling = true;
    const poller = (async () => {
      while (polling) {
        const t = nowMs();
        await request(A, 'GET', '/v1/migrations');
        api.push(nowMs() - t);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    // the orchestrator is not one of the guests: the API client runs at the daemons' priority
    // (as root -5) while it measures, and goes back before the next batch starts processes
    if (clientNice !== 0) setProcessNice(clientNice);
    const cpu0 = cpuTimes();
    const t0 = nowMs();
    const ids = await Promise.all(
      names.map(
        async (name) =>
          (await request<{ id: string }>(A, 'POST', '/v1/migrations', { guest: name, to: { host: link?.far ?? '127.0.0.1', port: b.port } })).body.id,
      ),
    );
    const done = new Map<string, { state: string; report?: MigrationReport; error?: { code: string; message: string } }>();
    let tEnd = t0;
    while (done.size < n) {
      for (const id of ids) {
        if (done.has(id)) continue;
        const { body } = await request<{ state: string; report?: MigrationReport; error?: { code: string; message: string } }>(
          A,
          'GET',
          `/v1/migrations/${id}`,
        );
        if (['completed', 'failed', 'cancelled'].includes(body.state)) {
          done.set(id, body);
          tEnd = nowMs();
        }
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    polling = false;
    await poller;
    const cpu1 = cpuTimes();
    if (clientNice !== 0) setProcessNice(0);
    const health = (await request<{ memory_budget: { peak_bytes: number } }>(B, 'GET', '/v1/health')).body;
    const incoming = (await request<{ migrations: { guest_pid?: number; state: string }[] }>(B, 'GET', '/v1/migrations?direction=incoming')).body.migrations;
    const destPids = incoming.map((m) => m.guest_pid ?? 0).filter((p) => p > 0);
    pids.push(...destPids);
    const checks = await Promise.all(destPids.map((pid) => observer.waitFor((x) => x.pid === pid && x.verify !== undefined, 300_000).catch(() => undefined)));
    const reports = [...done.values()].flatMap((d) => (d.report ? [d.report] : []));
    const batchMs = tEnd - t0;
    const quantile = (key: 'total_ms' | 'prep_ms' | 'downtime_ms', q: number, digits: number): number =>
      +pct(
        reports.map((r) => r[key]),
        q,
      ).toFixed(digits);
    return {
      link: link ? '1gbit-netns' : 'loopback',
      background_guests: background,
      parallel: values.parallel ? Number(values.parallel) : 'default',
      pinned: pin,
      guest_nice: values['guest-nice'] ? Number(values['guest-nice']) : 0,
      daemon_nice: values['daemon-nice'] ? Number(values['daemon-nice']) : process.getuid?.() === 0 ? -5 : 0,
      client_nice: clientNice,
      migrations: n,
      completed: reports.length,
      verified: checks.filter((c) => c?.verify?.bad === 0).length,
      batch_s: +(batchMs / 1e3).toFixed(2),
      total_ms_p50: quantile('total_ms', 0.5, 0),
      total_ms_p99: quantile('total_ms', 0.99, 0),
      prep_ms_p50: quantile('prep_ms', 0.5, 0),
      prep_ms_p99: quantile('prep_ms', 0.99, 0),
      downtime_ms_p50: quantile('downtime_ms', 0.5, 2),
      downtime_ms_p99: quantile('downtime_ms', 0.99, 2),
      aggregate_mib_s: +((reports.length * size) / 2 ** 20 / (batchMs / 1e3)).toFixed(1),
      peak_reserved_mib: +(health.memory_budget.peak_bytes / 2 ** 20).toFixed(0),
      api_ms_p50: +pct(api, 0.5).toFixed(2),
      api_ms_p99: +pct(api, 0.99).toFixed(2),
      api_requests: api.length,
      host_busy_cpus: +(((cpu1.busy - cpu0.busy) / (cpu1.total - cpu0.total)) * os.availableParallelism()).toFixed(2),
      errors: [...done.values()].flatMap((d) => (d.error ? [`${d.error.code}: ${d.error.message}`] : [])),
    };
  } finally {
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone (a source guest exits once it runs at the destination)
      }
    }
    await a.stop();
    await b.stop();
    observer.close();
    rmSync(dir, { recursive: true, force: true });
    await new Promise((r) => setTimeout(r, 1000)); // the guests' memory is given back before the next batch
  }
}

const m = machine();
const rows: Row[] = [];
/** Runs a batch and prints its row, with its throughput over a single migration's on the same link. */
async function batchRow(n: number, link: NetLink | undefined): Promise<void> {
  const row = await batch(n, link);
  rows.push(row);
  const single = rows.find((r) => r.link === row.link && r.migrations === 1);
  emit({
    bench: 'concurrent',
    ...row,
    ...(single ? { throughput_vs_single: +(row.aggregate_mib_s / single.aggregate_mib_s).toFixed(2) } : {}),
    size_mib: size / 2 ** 20,
    rate_mib_s: rate,
    machine: m,
  });
}
if (values.link !== 'netns') {
  for (const n of counts) await batchRow(n, undefined);
}
if (values.link !== 'loopback') {
  const link = createLink();
  try {
    for (const n of [1, Math.max(...counts)]) await batchRow(n, link);
  } finally {
    link.remove();
  }
}
