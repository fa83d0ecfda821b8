/**
 * bench/holes: what livemig touches of a guest's memory (issue 32), against baselines measured
 * in the same run, so that a slow host can be told from a slow engine:
 * - first_touch: this host's cost of a first touch of fresh 4 KiB pages (MADV_POPULATE_WRITE of
 *   256 MiB of a new memfd) and of mapping populated pages again through a new mapping
 *   (MADV_POPULATE_READ of the same memfd), per MiB and per GiB;
 * - first_touch also: reading 1 GiB of populated memfd pages with pread (Node), and
 *   read_floor: the least a reader pays to check 1 GiB of populated pages, through the files and
 *   where they lie in a populated mapping, on 1 and 2 threads (build/Release/read_floor, C);
 * - raw_tcp_region: the raw-TCP ceiling from and into 1 GiB of populated memory, 1 and 2 streams,
 *   through mappings and through the memfds' files (as livemig's data path);
 * - livemig on idle guests, interleaved run by run: `zero` 1 GiB (every page populated, all
 *   zero: nothing to send), `random` 1 GiB (every page goes), and `sparse` at 16x the size
 *   (1/16 of it written: the same amount of data in a region 16x larger, the rest holes);
 *   each with first pass, total, downtime, hole pages, and the source's held memory growth;
 *   `random` and `sparse` also with the receiver's --prealloc (its memory touched before the
 *   first page, as the raw ceiling's is), run beside the plain ones.
 *   node dist/bench/holes.js [--runs 3] [--size 1GiB] [--sparse-factor 16] [--cases first_touch,raw,demo] [--prealloc both|on|off]
 */
import { execFileSync } from 'node:child_process';
import { readSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport } from '../src/demo/demo.js';
import { Region } from '../src/region/region.js';
import { emit, machine, median, nowMs } from './common.js';
import { rawStreams } from './raw.js';

const MiB = 1 << 20;

async function firstTouch(): Promise<Record<string, number>> {
  const bytes = 256 * MiB;
  const region = Region.create(bytes, { name: 'bench-first-touch' });
  try {
    let t = nowMs();
    await region.populateAsync(true);
    const touchMs = nowMs() - t;
    const again = Region.adopt(region.fd, bytes);
    try {
      t = nowMs();
      await again.populateAsync(false, await again.dataExtents());
      const mapMs = nowMs() - t;
      // the least any reader pays to know populated pages' content: one pread of each byte
      // into a buffer that stays in cache (one thread)
      const buf = Buffer.alloc(MiB);
      t = nowMs();
      for (let at = 0; at < bytes; at += MiB) readSync(region.fd, buf, 0, MiB, at);
      const readMs = nowMs() - t;
      return {
        first_touch_ms_per_mib: +(touchMs / 256).toFixed(3),
        map_populated_ms_per_gib: +(mapMs * 4).toFixed(1),
        pread_populated_ms_per_gib: +(readMs * 4).toFixed(1),
      };
    } finally {
      again.release();
    }
  } finally {
    region.release();
  }
}

const READ_FLOOR = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../build/Release/read_floor');

/** build/Release/read_floor's passes over `mib` MiB: the median ms per way and thread count. */
function readFloor(mib: number): Record<string, unknown>[] {
  const lines = execFileSync(READ_FLOOR, [String(mib)])
    .toString()
    .trim()
    .split('\n');
  const passes = lines.map((l) => JSON.parse(l) as { via: string; threads: number; ms: number; populate_ms: number });
  const out: Record<string, unknown>[] = [];
  for (const via of ['files', 'mapping'])
    for (const threads of [1, 2]) {
      const these = passes.filter((p) => p.via === via && p.threads === threads);
      const ms = these.map((p) => p.ms);
      out.push({
        bench: 'holes',
        case: 'read_floor',
        via,
        threads,
        mib,
        ms: median(ms),
        range_ms: [Math.min(...ms), Math.max(...ms)],
        ...(via === 'mapping' ? { populate_ms: median(these.map((p) => p.populate_ms)) } : {}),
      });
    }
  return out;
}

const pick = (r: DemoReport): Record<string, number | boolean | string> => ({
  first_pass_ms: r.per_round[0]?.duration_ms ?? Number.NaN,
  total_ms: r.total_ms,
  downtime_ms: r.downtime_ms,
  prep_ms: r.prep_ms,
  hole_pages: r.hole_pages,
  pages_sent: r.pages_sent,
  wire_mib: +(r.wire_bytes / MiB).toFixed(1),
  source_held_before_mib: +(r.source_memory.held_before_bytes / MiB).toFixed(1),
  source_growth_mib: +((r.source_memory.held_at_release_bytes - r.source_memory.held_before_bytes) / MiB).toFixed(1),
  verified: r.verified && r.guest_verified.bad === 0,
  read_path: r.read_path,
  // where the pause went (an idle guest's is a few ms; one that is not says why here)
  stop_send_ms: r.stop_and_copy.send_ms,
  stop_final_collect_ms: r.stop_and_copy.final_collect_ms,
  stop_commit_ms: r.stop_and_copy.commit_ms,
});

function summary(name: string, runs: Record<string, number | boolean | string>[]): Record<string, unknown> {
  const out: Record<string, unknown> = { bench: 'holes', case: name, runs: runs.length };
  for (const k of ['first_pass_ms', 'total_ms', 'downtime_ms', 'prep_ms', 'source_growth_mib']) {
    const xs = runs.map((r) => r[k] as number);
    out[k] = +median(xs).toFixed(1);
    out[`${k}_range`] = [Math.min(...xs), Math.max(...xs)];
  }
  for (const k of ['hole_pages', 'pages_sent', 'wire_mib', 'source_held_before_mib']) out[k] = median(runs.map((r) => r[k] as number));
  out['verified'] = runs.every((r) => r['verified']);
  return out;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      size: { type: 'string', default: String(1 << 30) },
      'sparse-factor': { type: 'string', default: '16' },
      cases: { type: 'string', default: 'first_touch,raw,demo' },
      prealloc: { type: 'string', default: 'both' },
    },
  });
  const runs = Number(values.runs);
  const size = Number(values.size);
  const factor = Number(values['sparse-factor']);
  const cases = new Set(values.cases!.split(','));
  const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: path.dirname(fileURLToPath(import.meta.url)) })
    .toString()
    .trim();
  emit({ bench: 'holes', case: 'machine', ...machine(), commit, region_bytes: size });
  if (cases.has('first_touch')) {
    emit({ bench: 'holes', case: 'first_touch', ...(await firstTouch()) });
    for (const line of readFloor(size >> 20)) emit(line);
  }
  // the raw-TCP ceilings: from and into populated memory through mappings (as a migration
  // engine that maps guest memory moves it), and through the memfds' files (livemig's path)
  const raw: Record<string, number> = {};
  if (cases.has('raw')) {
    for (const via of ['mapped', 'files'] as const) {
      for (const streams of [1, 2]) {
        const got: number[] = [];
        for (let i = 0; i < runs; i++) got.push((await rawStreams(streams, size, undefined, via)).ms);
        raw[`${via}_${streams}`] = median(got);
        emit({ bench: 'holes', case: 'raw_tcp_region', via, streams, ms: +median(got).toFixed(1), range_ms: [Math.min(...got), Math.max(...got)] });
      }
    }
  }
  if (!cases.has('demo')) return;
  const g = (content: string, bytes: number) => guestSpecOf({ size: bytes, content, rate: 0, pattern: 'uniform', hotSize: 64 << 20 });
  const prealloc = values.prealloc === 'on' ? [true] : values.prealloc === 'off' ? [false] : [false, true];
  const kinds = [
    { name: 'zero', guest: g('zero', size), prealloc: false },
    ...prealloc.flatMap((p) => [
      { name: `random${p ? '_prealloc' : ''}`, guest: g('random', size), prealloc: p },
      { name: `sparse_x${factor}${p ? '_prealloc' : ''}`, guest: g('sparse', size * factor), prealloc: p },
    ]),
  ];
  const got: Record<string, Record<string, number | boolean | string>[]> = {};
  for (let i = 0; i < runs; i++) {
    for (const k of kinds) {
      const r = await runDemo({ guest: k.guest, ...(k.prealloc ? { receiverArgs: ['--prealloc'] } : {}) });
      (got[k.name] ??= []).push(pick(r));
      emit({ bench: 'holes', case: `${k.name}_run`, run: i + 1, region_bytes: k.guest.size, ...pick(r) });
    }
  }
  const s = Object.fromEntries(kinds.map((k) => [k.name, summary(k.name, got[k.name]!)]));
  for (const k of kinds) emit(s[k.name]!);
  for (const p of prealloc) {
    const tag = p ? '_prealloc' : '';
    const random = s[`random${tag}`] as Record<string, number>;
    const sparse = s[`sparse_x${factor}${tag}`] as Record<string, number>;
    emit({
      bench: 'holes',
      case: `ratios${tag}`,
      // ceiling time / livemig's time: 1.0 is the ceiling's speed, above it faster
      ...Object.fromEntries(Object.entries(raw).map(([k, ms]) => [`random_first_pass_speed_over_raw_${k}`, +(ms / random['first_pass_ms']!).toFixed(2)])),
      sparse_total_over_random_total: +(sparse['total_ms']! / random['total_ms']!).toFixed(2),
    });
  }
}

await main();
