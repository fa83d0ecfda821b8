/**
 * bench/e2e: a 1 GiB guest migrated on loopback, against baselines measured in the same run:
 * the raw-TCP ceiling (the same socket setup, a receiver process, 1 MiB writes of the same
 * byte count) and a naive stop-and-copy (pause, send everything once, resume there).
 *   node dist/bench/e2e.js [--size 1GiB] [--runs 5]
 */
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport, type GuestSpec } from '../src/demo/demo.js';
import { emit, machine, median } from './common.js';
import { rawTcpCeiling } from './raw-tcp.js';

const { values } = parseArgs({ options: { size: { type: 'string', default: String(1 << 30) }, runs: { type: 'string', default: '5' } } });
const size = Number(values.size);
const runs = Number(values.runs);

{
  emit({ bench: 'e2e', case: 'machine', ...machine(), region_bytes: size });
  const ceilings: number[] = [];
  for (let i = 0; i < 3; i++) ceilings.push(await rawTcpCeiling(size));
  const ceiling = median(ceilings);
  emit({ bench: 'e2e', case: 'raw_tcp_ceiling', bytes: size, ms: +ceiling.toFixed(1), mb_s: +(size / 1e3 / ceiling).toFixed(0), runs: 3 });

  const g = (content: string, rate: number): GuestSpec => guestSpecOf({ size, content, rate, pattern: 'uniform', hotSize: 64 << 20 });
  const idle: DemoReport[] = [];
  for (let i = 0; i < 3; i++) idle.push(await runDemo({ guest: g('random', 0), downtimeLimitMs: 20 }));
  const firstPass = median(idle.map((r) => r.per_round[0]!.duration_ms));
  emit({
    bench: 'e2e',
    case: 'idle_random_first_pass',
    first_pass_ms: firstPass,
    mb_s: +(size / 1e3 / firstPass).toFixed(0),
    ratio_to_raw_tcp: +(ceiling / firstPass).toFixed(3),
    total_ms: median(idle.map((r) => r.total_ms)),
    prep_ms: median(idle.map((r) => r.prep_ms)),
    verified: idle.every((r) => r.verified),
    runs: 3,
  });

  const naive: DemoReport[] = [];
  for (let i = 0; i < 3; i++) naive.push(await runDemo({ guest: g('mixed', 64), downtimeLimitMs: 20, maxRounds: 1, naive: true }));
  emit({
    bench: 'e2e',
    case: 'naive_stop_and_copy_mixed_64',
    downtime_ms: median(naive.map((r) => r.downtime_ms)),
    guest_gap_ms: median(naive.map((r) => r.guest_gap_ms)),
    total_ms: median(naive.map((r) => r.total_ms)),
    verified: naive.every((r) => r.verified),
    runs: 3,
  });

  const live: DemoReport[] = [];
  for (let i = 0; i < runs; i++) {
    const r = await runDemo({ guest: g('mixed', 64), downtimeLimitMs: 20 });
    live.push(r);
    emit({
      bench: 'e2e',
      case: 'livemig_mixed_64_run',
      run: i,
      downtime_ms: r.downtime_ms,
      guest_gap_ms: r.guest_gap_ms,
      guest_gap_preparation_ms: r.guest_gap_preparation_ms,
      total_ms: r.total_ms,
      rounds: r.rounds,
      wire_bytes: r.wire_bytes,
      stop_and_copy: r.stop_and_copy,
      verified: r.verified,
    });
  }
  const dt = median(live.map((r) => r.downtime_ms));
  emit({
    bench: 'e2e',
    case: 'livemig_mixed_64',
    downtime_ms: dt,
    guest_gap_ms: median(live.map((r) => r.guest_gap_ms)),
    total_ms: median(live.map((r) => r.total_ms)),
    prep_ms: median(live.map((r) => r.prep_ms)),
    rounds: median(live.map((r) => r.rounds)),
    wire_bytes_over_region: +(median(live.map((r) => r.wire_bytes)) / size).toFixed(3),
    downtime_vs_naive: +(median(naive.map((r) => r.downtime_ms)) / dt).toFixed(1),
    verified: live.every((r) => r.verified),
    runs,
  });
}
