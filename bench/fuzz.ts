/**
 * bench/fuzz: the fuzz test's generator (test/reference/fuzz.ts) at scale against one
 * long-lived receiver: counts per frame type and outcome, and descriptors, RSS and V8 heap after
 * each chunk of cases (flat is what the receiver must show).
 *   node dist/bench/fuzz.js [--cases 1000000] [--chunk 50000] [--seed 1]
 */
import { readdirSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { listen } from '../src/receiver/listen.js';
import { FUZZ_PAGES, Rng } from '../test/reference/fuzz.js';
import { runFuzz, type FuzzCounts } from '../test/reference/fuzz-run.js';
import { emit, machine } from './common.js';

const { values } = parseArgs({
  options: { cases: { type: 'string', default: '1000000' }, chunk: { type: 'string', default: '50000' }, seed: { type: 'string', default: '1' } },
});
const total = Number(values.cases);
const chunk = Number(values.chunk);
const rng = new Rng(BigInt(values.seed!));
let activated = 0;
const rx = await listen('127.0.0.1', 0, { maxRegionBytes: FUZZ_PAGES * 4096, idleTimeoutMs: 2000, activate: async () => void activated++ });
emit({ bench: 'fuzz', case: 'machine', ...machine(), cases: total, seed: values.seed });
const all: FuzzCounts = { cases: 0, outcomes: {}, byType: {}, strange: [] };
const t0 = performance.now();
for (let done = 0; done < total; done += chunk) {
  const c = await runFuzz(rx, rx.port, rng, Math.min(chunk, total - done));
  all.cases += c.cases;
  for (const [k, n] of Object.entries(c.outcomes)) all.outcomes[k] = (all.outcomes[k] ?? 0) + n;
  for (const [t, row] of Object.entries(c.byType)) for (const [k, n] of Object.entries(row)) (all.byType[t] ??= {})[k] = (all.byType[t]![k] ?? 0) + n;
  all.strange.push(...c.strange.slice(0, 20 - all.strange.length));
  const m = process.memoryUsage();
  emit({
    bench: 'fuzz',
    case: 'chunk',
    cases: all.cases,
    seconds: +((performance.now() - t0) / 1e3).toFixed(1),
    fds: readdirSync('/proc/self/fd').length,
    rss_mib: +(m.rss / 2 ** 20).toFixed(1),
    heap_used_mib: +(m.heapUsed / 2 ** 20).toFixed(1),
    external_mib: +(m.external / 2 ** 20).toFixed(1),
  });
}
emit({
  bench: 'fuzz',
  case: 'summary',
  cases: all.cases,
  activated,
  outcomes: all.outcomes,
  by_type: all.byType,
  strange: all.strange,
  seconds: +((performance.now() - t0) / 1e3).toFixed(1),
});
await rx.close();
