/**
 * Two builds of livemig, interleaved: the same demo configurations run alternately with each
 * build's CLI (`A/dist/src/cli/main.js demo --json ...`), so that a host that drifts over the
 * sitting drifts for both. Prints a JSON line per run and one summary line per configuration
 * and build: medians and ranges of downtime, guest gap, total time and the pages the pause
 * carried (the downtime follows them, and they vary with the run), and B's medians over A's.
 *
 *   node dist/bench/compare.js --a DIR --b DIR [--runs 5] [--configs default,hot,random,postcopy]
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { parseArgs } from 'node:util';

const CONFIGS: Record<string, string[]> = {
  default: [],
  hot: ['--pattern', 'hot', '--hot-size', '64MiB', '--rate', '256'],
  random: ['--content', 'random', '--rate', '2048'],
  postcopy: ['--mode', 'postcopy', '--rate', '256'],
};

const { values } = parseArgs({
  options: {
    a: { type: 'string' },
    b: { type: 'string' },
    runs: { type: 'string', default: '5' },
    configs: { type: 'string', default: Object.keys(CONFIGS).join(',') },
  },
});
if (!values.a || !values.b) {
  process.stderr.write('usage: node dist/bench/compare.js --a DIR --b DIR [--runs N] [--configs default,hot,random,postcopy]\n');
  process.exit(2);
}
const builds = { a: path.resolve(values.a), b: path.resolve(values.b) };
const runs = Number(values.runs);
const names = values.configs!.split(',');
for (const n of names) if (!CONFIGS[n]) throw new Error(`unknown configuration '${n}' (known: ${Object.keys(CONFIGS).join(', ')})`);

interface Sample {
  downtime_ms: number;
  guest_gap_ms: number;
  total_ms: number;
  verified: boolean;
  /** what the pause had to carry: how much the downtime depends on the run, not the build */
  stop_pages: number;
  rounds: number;
  /** where the pause went (the source's report): pause, final collect, send, commit, activate */
  stop_phases?: Record<string, number>;
}

function phases(stop: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.entries(stop).filter(([k]) => k.endsWith('_ms')));
}

function demo(dir: string, args: string[]): Sample {
  const r = spawnSync(process.execPath, [path.join(dir, 'dist/src/cli/main.js'), 'demo', '--json', ...args], { encoding: 'utf8', timeout: 600_000 });
  if (r.status !== 0) throw new Error(`${dir}: demo ${args.join(' ')} exited ${r.status}: ${r.stderr}`);
  const rep = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Omit<Sample, 'stop_pages'> & { stop_and_copy: { pages: number } & Record<string, number> };
  return {
    downtime_ms: rep.downtime_ms,
    guest_gap_ms: rep.guest_gap_ms,
    total_ms: rep.total_ms,
    verified: rep.verified,
    stop_pages: rep.stop_and_copy.pages,
    rounds: rep.rounds,
    stop_phases: phases(rep.stop_and_copy),
  };
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((p, q) => p - q);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const summary = (xs: number[]) => ({ median: +median(xs).toFixed(2), min: +Math.min(...xs).toFixed(2), max: +Math.max(...xs).toFixed(2) });

for (const name of names) {
  const got: Record<'a' | 'b', Sample[]> = { a: [], b: [] };
  for (let i = 0; i < runs; i++) {
    for (const which of (i % 2 === 0 ? ['a', 'b'] : ['b', 'a']) as ('a' | 'b')[]) {
      const s = demo(builds[which], CONFIGS[name]!);
      got[which].push(s);
      process.stdout.write(JSON.stringify({ config: name, build: which, run: i, ...s }) + '\n');
    }
  }
  const stat = (which: 'a' | 'b') => ({
    downtime_ms: summary(got[which].map((s) => s.downtime_ms)),
    guest_gap_ms: summary(got[which].map((s) => s.guest_gap_ms)),
    total_ms: summary(got[which].map((s) => s.total_ms)),
    stop_pages: summary(got[which].map((s) => s.stop_pages)),
    verified: got[which].every((s) => s.verified),
  });
  const sa = stat('a');
  const sb = stat('b');
  const ratio = (k: 'downtime_ms' | 'guest_gap_ms' | 'total_ms') => +(sb[k].median / sa[k].median).toFixed(3);
  process.stdout.write(
    JSON.stringify({
      config: name,
      args: CONFIGS[name],
      runs,
      a: { dir: builds.a, ...sa },
      b: { dir: builds.b, ...sb },
      b_over_a: { downtime: ratio('downtime_ms'), guest_gap: ratio('guest_gap_ms'), total: ratio('total_ms') },
    }) + '\n',
  );
}
