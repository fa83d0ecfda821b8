/**
 * bench/postcopy: a 1 GiB mixed guest written at 256 and 1024 MiB/s (uniform), migrated in
 * post-copy (the guest runs at the destination at once; pages come on demand and in the
 * background) and, in the same run, in pre-copy, whose first pass is the baseline for the
 * post-copy total time. Downtime, fault latency (p50/p99, from the fault read to the page
 * mapped in the guest), pages pulled vs pushed, time the guest waited on faults, bytes.
 * Each run's p99 and the guest's largest heartbeat gap are printed too ({mode}_run), and the
 * worst of them beside the medians: a user runs one migration, not a median.
 *   node dist/bench/postcopy.js [--size 1GiB] [--runs 3] [--rates 256,1024] [--modes postcopy,hybrid]
 */
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport } from '../src/demo/demo.js';
import { emit, machine, median } from './common.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: String(1 << 30) },
    runs: { type: 'string', default: '3' },
    rates: { type: 'string', default: '256,1024' },
    modes: { type: 'string', default: 'postcopy' },
  },
});
const size = Number(values.size);
const runs = Number(values.runs);
emit({ bench: 'postcopy', case: 'machine', ...machine(), region_bytes: size });

for (const rate of values.rates!.split(',').map(Number)) {
  const g = guestSpecOf({ size, content: 'mixed', rate, pattern: 'uniform', hotSize: 64 << 20 });
  const pre: DemoReport[] = [];
  const post: Record<string, DemoReport[]> = {};
  for (let i = 0; i < runs; i++) {
    // interleaved, so a drift of the host hits both alike
    pre.push(await runDemo({ guest: g, policy: { onStall: 'force' } }));
    for (const mode of values.modes!.split(',')) {
      const r = await runDemo({ guest: g, policy: { mode: mode as 'postcopy' | 'hybrid' } });
      (post[mode] ??= []).push(r);
      // a user runs one migration: each run's tail, with the guest's largest heartbeat gap beside it
      const dp = r.destination_postcopy ?? {};
      emit({
        bench: 'postcopy',
        case: `${mode}_run`,
        write_mib_s: rate,
        run: i,
        fault_latency_p50_us: dp['fault_latency_p50_us'],
        fault_latency_p99_us: dp['fault_latency_p99_us'],
        faults: dp['faults'],
        guest_gap_ms: r.guest_gap_ms,
        downtime_ms: r.downtime_ms,
        total_ms: r.total_ms,
        pages_resent: r.postcopy?.pages_resent,
        verified: r.verified && r.guest_verified.bad === 0,
      });
    }
  }
  const firstPass = median(pre.map((r) => r.per_round[0]?.duration_ms ?? r.total_ms));
  emit({
    bench: 'postcopy',
    case: 'precopy',
    write_mib_s: rate,
    total_ms: median(pre.map((r) => r.total_ms)),
    first_pass_ms: firstPass,
    downtime_ms: median(pre.map((r) => r.downtime_ms)),
    guest_gap_ms: median(pre.map((r) => r.guest_gap_ms)),
    guest_gap_preparation_ms: median(pre.map((r) => r.guest_gap_preparation_ms)),
    bytes_over_region: +(median(pre.map((r) => r.wire_bytes)) / size).toFixed(3),
    verified: pre.every((r) => r.verified),
    runs,
  });
  for (const [mode, rs] of Object.entries(post)) {
    const d = (k: string): number => median(rs.map((r) => Number(r.destination_postcopy?.[k] ?? NaN)));
    const total = median(rs.map((r) => r.total_ms));
    emit({
      bench: 'postcopy',
      case: mode,
      write_mib_s: rate,
      total_ms: total,
      total_over_precopy_first_pass: +(total / firstPass).toFixed(2),
      downtime_ms: median(rs.map((r) => r.downtime_ms)),
      guest_gap_ms: median(rs.map((r) => r.guest_gap_ms)),
      guest_gap_preparation_ms: median(rs.map((r) => r.guest_gap_preparation_ms)),
      fault_latency_p50_us: d('fault_latency_p50_us'),
      fault_latency_p99_us: d('fault_latency_p99_us'),
      fault_latency_p99_us_worst_run: Math.max(...rs.map((r) => Number(r.destination_postcopy?.['fault_latency_p99_us'] ?? NaN))),
      guest_gap_ms_worst_run: Math.max(...rs.map((r) => r.guest_gap_ms)),
      faults: d('faults'),
      pages_pulled: d('pages_pulled'),
      pages_pushed: d('pages_pushed'),
      guest_blocked_ms: d('blocked_ms'),
      bytes_over_region: +(median(rs.map((r) => r.wire_bytes)) / size).toFixed(3),
      verified: rs.every((r) => r.verified),
      runs,
    });
  }
}
