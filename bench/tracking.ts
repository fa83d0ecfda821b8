/**
 * bench/tracking: collect() cost per GiB for each tracking backend at 0%, 0.1%, 1%, 10% and
 * 100% of pages dirty; the cost a guest pays for its first write to a protected page; and
 * the memory each backend adds. One JSON line per case.
 *   node dist/bench/tracking.js [--size 1GiB] [--reps 9]
 */
import { parseArgs } from 'node:util';
import { Region } from '../src/region/region.js';
import { ExternalTracker, HashTracker, UffdAsyncTracker, probe, type DirtyTracker } from '../src/tracking/index.js';
import { emit, machine, median, nowMs } from './common.js';

const { values } = parseArgs({ options: { size: { type: 'string', default: String(1 << 30) }, reps: { type: 'string', default: '9' } } });
const size = Number(values.size);
const reps = Number(values.reps);
const GiB = 1 << 30;
const fractions = [0, 0.001, 0.01, 0.1, 1];

emit({ bench: 'tracking', case: 'machine', ...machine(), region_bytes: size });
for (const p of probe()) emit({ bench: 'tracking', case: 'probe', backend: p.backend, available: p.available, reason: p.reason });

const region = Region.create(size, { name: 'bench-tracking', reserve: true, populate: true });
const view = region.view();
const pageCount = region.pageCount;
const words = new Uint32Array(view.buffer, view.byteOffset, size / 4);
const pageWords = region.pageSize / 4;
let stamp = 1;
let seed = 12345;
function rnd(n: number): number {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % n;
}
/** Dirties `fraction` of the pages (distinct, random) with a new value; returns how many. */
function dirty(fraction: number): number {
  stamp++;
  if (fraction >= 1) {
    for (let p = 0; p < pageCount; p++) words[p * pageWords + (stamp % pageWords)] = stamp;
    return pageCount;
  }
  const n = Math.round(pageCount * fraction);
  const seen = new Set<number>();
  while (seen.size < n) {
    const p = rnd(pageCount);
    if (seen.has(p)) continue;
    seen.add(p);
    words[p * pageWords + (stamp % pageWords)] = stamp;
  }
  return n;
}

async function collectCase(tracker: DirtyTracker, label: string, sync?: () => Uint32Array): Promise<void> {
  for (const fraction of fractions) {
    const times: number[] = [];
    const n = tracker.backend === 'hash' && fraction === 1 ? Math.min(reps, 5) : reps;
    for (let i = 0; i < n; i++) {
      const want = dirty(fraction);
      if (tracker instanceof ExternalTracker) tracker.markDirty(lastDirtyList(fraction));
      const t0 = nowMs();
      const got = sync ? sync() : await tracker.collect();
      times.push(nowMs() - t0);
      if (got.length !== want) throw new Error(`${label}: collected ${got.length} pages, expected ${want}`);
    }
    const ms = median(times);
    emit({
      bench: 'tracking',
      case: 'collect',
      backend: label,
      dirty_fraction: fraction,
      dirty_pages: Math.round(pageCount * fraction),
      collect_ms: +ms.toFixed(3),
      collect_ms_per_gib: +((ms * GiB) / size).toFixed(3),
      scan_gb_s: +(size / 1e9 / (ms / 1e3)).toFixed(2),
      reps: n,
    });
  }
}

// The external tracker's report: the pages the last dirty() wrote (recomputed cheaply by
// scanning the words it stamped).
function lastDirtyList(fraction: number): Uint32Array {
  if (fraction >= 1) return Uint32Array.from({ length: pageCount }, (_, i) => i);
  const out: number[] = [];
  const slot = stamp % pageWords;
  for (let p = 0; p < pageCount; p++) if (words[p * pageWords + slot] === stamp) out.push(p);
  return Uint32Array.from(out);
}

function firstWriteCost(collectSync: () => unknown, label: string): void {
  // Baseline: the same writes to pages that are already writable (no tracking armed).
  const n = Math.min(65536, pageCount);
  const stride = Math.floor(pageCount / n);
  const writeAll = (): number => {
    stamp++;
    const t0 = nowMs();
    for (let k = 0; k < n; k++) words[k * stride * pageWords] = stamp;
    return nowMs() - t0;
  };
  const armed: number[] = [];
  const unarmed: number[] = [];
  for (let i = 0; i < reps; i++) {
    collectSync(); // re-protect everything
    armed.push(writeAll());
    unarmed.push(writeAll()); // same pages again: now written, so no fault
  }
  const a = (median(armed) * 1e3) / n;
  const u = (median(unarmed) * 1e3) / n;
  emit({
    bench: 'tracking',
    case: 'first_write',
    backend: label,
    pages: n,
    us_per_first_write: +a.toFixed(3),
    us_per_write_unprotected: +u.toFixed(3),
    extra_us: +(a - u).toFixed(3),
  });
}

function rss(): number {
  return process.memoryUsage().rss;
}

const status = Object.fromEntries(probe().map((p) => [p.backend, p]));

if (status['uffd-async']!.available) {
  const before = rss();
  const t = new UffdAsyncTracker(region);
  const t0 = nowMs();
  await t.start();
  emit({ bench: 'tracking', case: 'start', backend: 'uffd-async', start_ms: +(nowMs() - t0).toFixed(2) });
  await t.collect();
  emit({
    bench: 'tracking',
    case: 'memory',
    backend: 'uffd-async',
    rss_delta_bytes: rss() - before,
    structure_bytes: 32768 * 24,
    note: 'no per-page state in user space; one 768 KiB scan vector per thread',
  });
  await collectCase(t, 'uffd-async');
  await collectCase(t, 'uffd-async-sync', () => t.collectSync());
  firstWriteCost(() => t.collectSync(), 'uffd-async');
  await t.stop();
} else {
  emit({ bench: 'tracking', case: 'skipped', backend: 'uffd-async', reason: status['uffd-async']!.reason });
}
if (!status['soft-dirty']!.available) emit({ bench: 'tracking', case: 'skipped', backend: 'soft-dirty', reason: status['soft-dirty']!.reason });

{
  const before = rss();
  const t = new HashTracker(region);
  await t.start();
  emit({ bench: 'tracking', case: 'memory', backend: 'hash', rss_delta_bytes: rss() - before, structure_bytes: pageCount * 8, note: '8 bytes per page' });
  await collectCase(t, 'hash');
  await t.stop();
}
{
  const t = new ExternalTracker(region);
  await t.start();
  emit({ bench: 'tracking', case: 'memory', backend: 'external', structure_bytes: Math.ceil(pageCount / 8), note: '1 bit per page' });
  await collectCase(t, 'external');
  await t.stop();
}
region.release();
