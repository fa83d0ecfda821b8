/**
 * bench/convergence: a 1 GiB mixed guest written at 0, 64, 256 and 1024 MiB/s, uniformly or
 * over a 64 MiB hot set, migrated with the convergence policy (throttle on stall), WWS on and
 * off in the same run; on loopback and optionally through the 1 Gbit/s namespace link. The
 * idle migration of the same guest is the baseline for "less than 3x the idle time".
 *   node dist/bench/convergence.js [--size 1GiB] [--runs 1] [--links loopback[,1gbit]] [--rates 0,64,256,1024]
 *     [--patterns uniform,hot] [--downtime-limit 50]
 */
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport, type ReceiverPlace } from '../src/demo/demo.js';
import { emit, machine, median } from './common.js';
import { createLink, type NetLink } from './netlink.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: String(1 << 30) },
    runs: { type: 'string', default: '1' },
    links: { type: 'string', default: 'loopback' },
    rates: { type: 'string', default: '0,64,256,1024' },
    patterns: { type: 'string', default: 'uniform,hot' },
    'downtime-limit': { type: 'string', default: '50' },
  },
});
const size = Number(values.size);
const runs = Number(values.runs);
const limit = Number(values['downtime-limit']);
emit({ bench: 'convergence', case: 'machine', ...machine(), region_bytes: size, downtime_limit_ms: limit });

for (const linkName of values.links!.split(',')) {
  let link: NetLink | undefined;
  let at: ReceiverPlace = { prefix: [], host: '127.0.0.1' };
  if (linkName !== 'loopback') {
    link = createLink(linkName);
    at = { prefix: ['ip', 'netns', 'exec', link.ns], host: link.far, observer: link.near };
  }
  try {
    let idleMs: number | undefined;
    for (const rate of values.rates!.split(',').map(Number)) {
      for (const pattern of rate === 0 ? ['uniform'] : values.patterns!.split(',')) {
        for (const wws of [true, false]) {
          const rs: DemoReport[] = [];
          for (let i = 0; i < runs; i++) {
            rs.push(
              await runDemo({
                guest: guestSpecOf({ size, content: 'mixed', rate, pattern, hotSize: 64 << 20 }),
                downtimeLimitMs: limit,
                receiverAt: at,
                policy: { wws, onStall: 'throttle' },
              }),
            );
          }
          const total = median(rs.map((r) => r.total_ms));
          if (rate === 0 && wws) idleMs = total;
          const last = rs[rs.length - 1]!;
          emit({
            bench: 'convergence',
            case: 'migration',
            link: linkName,
            write_mib_s: rate,
            pattern,
            wws,
            total_ms: total,
            downtime_ms: median(rs.map((r) => r.downtime_ms)),
            guest_gap_ms: median(rs.map((r) => r.guest_gap_ms)),
            guest_gap_preparation_ms: median(rs.map((r) => r.guest_gap_preparation_ms)),
            bytes_over_region: +(median(rs.map((r) => r.wire_bytes)) / size).toFixed(3),
            rounds: median(rs.map((r) => r.rounds)),
            stop_and_copy_pages: median(rs.map((r) => r.stop_and_copy.pages)),
            max_throttle_percentage: Math.max(...rs.map((r) => r.max_throttle_percentage)),
            forced_stop: rs.some((r) => r.forced_stop),
            total_over_idle: idleMs ? +(total / idleMs).toFixed(2) : null,
            stop_reason: last.stop_reason,
            decisions: last.per_round.map((r) => `${r.decision}${r.cpu_throttle_percentage ? `@${r.cpu_throttle_percentage}%` : ''}`).join(','),
            verified: rs.every((r) => r.verified),
            runs: rs.length,
          });
        }
      }
    }
  } finally {
    link?.remove();
  }
}
