/**
 * bench/guests: real guests through the contract (issue 19, point 8).
 *   --what local:  `demo --local` (a same-host upgrade) of a 1 GiB reference guest and of the C
 *                  example guest, each run beside the plain pre-copy demo of the same guest as the
 *                  baseline. Targets: downtime <= 2 ms, total <= 10 ms.
 *   --what c:      the C example guest (256 MiB in two regions) and the reference guest of the
 *                  same 256 MiB, both writing 64 MiB/s and already running (`c_guest --listen`,
 *                  `livemig guest`), each migrated through the CLI: `livemig send --guest` to
 *                  `livemig receive [--guest-exec]`, alternating. Target: the C guest's downtime
 *                  within 10% of the reference guest's.
 * Prints one JSON line per run and a summary (median and range, ratios).
 * Each run is the command a user runs (`livemig demo --json …`, or the CLI pair), in processes
 * of its own.
 *   node dist/bench/guests.js --what local|c [--runs 10] [--size 1GiB]
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { cGuestArgs, cIncomingCommand } from '../src/workload/controller.js';
import type { MigrationReport } from '../src/source/types.js';
import type { DemoReport } from '../src/demo/demo.js';
import { emit, machine, median } from './common.js';

const { values } = parseArgs({
  options: { what: { type: 'string', default: 'local' }, runs: { type: 'string', default: '10' }, size: { type: 'string', default: '1GiB' } },
});
const runs = Number(values.runs);

interface Series {
  name: string;
  downtime: number[];
  total: number[];
  prep: number[];
  gap: number[];
}
const series = (name: string): Series => ({ name, downtime: [], total: [], prep: [], gap: [] });
const stat = (xs: number[]) => ({ median: +median(xs).toFixed(3), min: +Math.min(...xs).toFixed(3), max: +Math.max(...xs).toFixed(3) });

/** One `livemig demo --json ARGS`, as a user runs it (its own process, the CLI's scheduling hints). */
function demoCli(args: string[]): DemoReport {
  const r = spawnSync(process.execPath, [CLI, 'demo', '--json', ...args], { encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) throw new Error(`demo ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as DemoReport;
}

function one(s: Series, args: string[]): DemoReport {
  const r = demoCli(args);
  if (!r.verified || r.guest_verified.bad !== 0) throw new Error(`${s.name}: not verified (${r.guest_verified.bad} bad pages)`);
  s.downtime.push(r.downtime_ms);
  s.total.push(r.total_ms);
  s.prep.push(r.prep_ms);
  s.gap.push(r.guest_gap_ms);
  emit({
    bench: 'guests',
    what: values.what,
    series: s.name,
    run: s.downtime.length,
    downtime_ms: r.downtime_ms,
    total_ms: r.total_ms,
    prep_ms: r.prep_ms,
    end_to_end_ms: +(r.prep_ms + r.total_ms).toFixed(1),
    guest_gap_ms: r.guest_gap_ms,
    pages_sent: r.pages_sent,
    wire_bytes: r.wire_bytes,
    tracker: r.tracker,
  });
  return r;
}

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

/** One migration through the CLI of a guest already running; the sender's report. */
async function cliRun(s: Series, kind: 'reference' | 'c'): Promise<MigrationReport> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-bench-'));
  const socket = path.join(dir, 'guest.sock');
  const argv = kind === 'c' ? cGuestArgs(socket, { rate: 64 }) : [process.execPath, CLI, 'guest', '--socket', socket, '--size', '256MiB', '--rate', '64'];
  const guest = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const rx = spawn(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0', ...(kind === 'c' ? ['--guest-exec', cIncomingCommand().join(' ')] : [])], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const rxLines = createInterface({ input: rx.stdout! })[Symbol.asyncIterator]();
  let destPid = 0;
  try {
    await createInterface({ input: guest.stdout! })[Symbol.asyncIterator]().next(); // serving
    const { port } = JSON.parse((await rxLines.next()).value as string) as { port: number };
    await new Promise((r) => setTimeout(r, 300)); // its writes reach their rate
    const send = spawn(process.execPath, [CLI, 'send', '--guest', socket, '--to', `127.0.0.1:${port}`, '--json'], { stdio: ['ignore', 'pipe', 'inherit'] });
    const line = (await createInterface({ input: send.stdout! })[Symbol.asyncIterator]().next()).value as string;
    const r = JSON.parse(line) as MigrationReport & { error?: unknown };
    if (r.error || !r.verified) throw new Error(`${s.name}: ${line}`);
    for (
      let out = JSON.parse((await rxLines.next()).value as string) as { guest_pid?: number };
      ;
      out = JSON.parse((await rxLines.next()).value as string) as { guest_pid?: number }
    ) {
      if (out.guest_pid) {
        destPid = out.guest_pid;
        break;
      }
    }
    s.downtime.push(r.downtime_ms);
    s.total.push(r.total_ms);
    s.prep.push(r.prep_ms);
    emit({
      bench: 'guests',
      what: 'c',
      series: s.name,
      run: s.downtime.length,
      downtime_ms: r.downtime_ms,
      total_ms: r.total_ms,
      prep_ms: r.prep_ms,
      rounds: r.rounds,
      pages_sent: r.pages_sent,
      tracker: r.tracker,
    });
    return r;
  } finally {
    for (const p of [guest, rx]) if (p.exitCode === null) p.kill('SIGKILL');
    if (destPid) {
      try {
        process.kill(destPid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    rmSync(dir, { recursive: true, force: true });
    await new Promise((r) => setTimeout(r, 200)); // the guests' memory goes before the next run
  }
}

const summary = (list: Series[]) =>
  Object.fromEntries(
    list.map((s) => [
      s.name,
      {
        downtime_ms: stat(s.downtime),
        total_ms: stat(s.total),
        prep_ms: stat(s.prep),
        end_to_end_ms: stat(s.prep.map((p, i) => p + s.total[i]!)),
        guest_gap_ms: stat(s.gap),
      },
    ]),
  );

if (values.what === 'local') {
  const size = ['--size', values.size];
  const list = [series('reference-local'), series('reference-precopy'), series('c-local'), series('c-precopy')];
  for (let i = 0; i < runs; i++) {
    one(list[0]!, [...size, '--local']);
    one(list[1]!, size);
    one(list[2]!, ['--guest', 'c', '--local']);
    one(list[3]!, ['--guest', 'c']);
  }
  const m = (s: Series, k: 'downtime' | 'total') => median(s[k]);
  emit({
    bench: 'guests',
    what: 'local',
    summary: summary(list),
    ratio_local_over_precopy: {
      reference: {
        downtime: +(m(list[0]!, 'downtime') / m(list[1]!, 'downtime')).toFixed(3),
        total: +(m(list[0]!, 'total') / m(list[1]!, 'total')).toFixed(4),
      },
      c: { downtime: +(m(list[2]!, 'downtime') / m(list[3]!, 'downtime')).toFixed(3), total: +(m(list[2]!, 'total') / m(list[3]!, 'total')).toFixed(4) },
    },
    targets: { downtime_ms: 2, total_ms: 10 },
    machine: machine(),
  });
} else if (values.what === 'c') {
  const ref = series('reference-256MiB');
  const c = series('c-guest-256MiB');
  for (let i = 0; i < runs; i++) {
    await cliRun(ref, 'reference');
    await cliRun(c, 'c');
  }
  const cliSummary = (list: Series[]) =>
    Object.fromEntries(list.map((x) => [x.name, { downtime_ms: stat(x.downtime), total_ms: stat(x.total), prep_ms: stat(x.prep) }]));
  emit({
    bench: 'guests',
    what: 'c',
    summary: cliSummary([ref, c]),
    ratio_c_over_reference: { downtime: +(median(c.downtime) / median(ref.downtime)).toFixed(3) },
    target: 'downtime ratio <= 1.10',
    machine: machine(),
  });
} else {
  throw new Error(`--what must be local or c, got ${values.what}`);
}
