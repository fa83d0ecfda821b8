/**
 * bench/huge-pages: the same guest on 4 KiB shmem, shmem THP and 2 MiB hugetlbfs pages, at
 * each write rate: first pass, total, downtime, and the page bytes sent again after the first
 * pass (uffd-wp tracks a hugetlbfs page whole: one write there resends 2 MiB). The pool and the
 * THP policy are set for the run and put back (root); a backing the host cannot give is skipped
 * with the reason. Times are only comparable within one run on a quiet machine.
 *   node dist/bench/huge-pages.js [--size 1GiB] [--rates 64,256] [--runs 3] [--backings none,thp,hugetlb] [--content mixed]
 */
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport } from '../src/demo/demo.js';
import { HUGE_PAGE_MODES, type HugePages } from '../src/region/huge-pages.js';
import { emit, machine, median } from './common.js';
import { allowShmemThp, lockHost, reserveHugePages, type HostSetting } from './huge-host.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: String(1 << 30) },
    rates: { type: 'string', default: '64,256' },
    runs: { type: 'string', default: '3' },
    backings: { type: 'string', default: HUGE_PAGE_MODES.join(',') },
    content: { type: 'string', default: 'mixed' },
  },
});
const size = Number(values.size);
const rates = values.rates.split(',').map(Number);
const runs = Number(values.runs);
const backings = values.backings.split(',') as HugePages[];

/** page bytes sent after the first pass: pre-copy's later rounds and the stop-and-copy */
function resentBytes(r: DemoReport): number {
  return (r.pages_sent - (r.per_round[0]?.pages ?? 0)) * 4096;
}

function hostFor(backing: HugePages): HostSetting {
  // the source guest and the destination's reservation each hold the region
  if (backing === 'hugetlb') return reserveHugePages(2 * size);
  if (backing === 'thp') return allowShmemThp();
  return { restore: () => undefined };
}

emit({ bench: 'huge-pages', case: 'machine', ...machine(), region_bytes: size, content: values.content });
for (const backing of backings) {
  // the host's pool and policy: held for this backing's runs, so that a test beside it does not restore them under it
  const unlock = await lockHost();
  const host = hostFor(backing);
  try {
    if (host.skip) {
      emit({ bench: 'huge-pages', case: 'skipped', backing, reason: host.skip });
      continue;
    }
    for (const rate of rates) {
      const reports: DemoReport[] = [];
      for (let i = 0; i < runs; i++) {
        const guest = guestSpecOf({ size, content: values.content, rate, pattern: 'uniform', hotSize: 64 << 20, hugePages: backing });
        reports.push(await runDemo({ guest }));
      }
      const m = (f: (r: DemoReport) => number): number => +median(reports.map(f)).toFixed(3);
      emit({
        bench: 'huge-pages',
        case: `${backing}_${rate}`,
        backing: reports[0]!.backing,
        rate_mib_s: rate,
        runs,
        verified: reports.every((r) => r.verified),
        first_pass_ms: m((r) => r.per_round[0]?.duration_ms ?? 0),
        total_ms: m((r) => r.total_ms),
        downtime_ms: m((r) => r.downtime_ms),
        rounds: reports.map((r) => r.rounds),
        resent_bytes: reports.map(resentBytes),
        resent_bytes_median: m(resentBytes),
        wire_bytes_median: m((r) => r.wire_bytes),
        guest_writes: reports.map((r) => Number(r.guest_verified.writes)),
        // each run's times and how its pre-copy ended: the medians alone hide a pause the throttle could not shorten
        per_run: reports.map((r) => ({
          first_pass_ms: r.per_round[0]?.duration_ms ?? 0,
          total_ms: r.total_ms,
          downtime_ms: r.downtime_ms,
          stop_pages: r.stop_and_copy.pages,
          forced_stop: r.forced_stop,
          max_throttle_percentage: r.max_throttle_percentage,
        })),
      });
    }
  } finally {
    host.restore();
    unlock();
  }
}
