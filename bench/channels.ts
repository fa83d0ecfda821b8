/**
 * bench/channels: parallel channels and the stability of the encoding choice, 1 GiB guests, on
 * loopback and through the 1 Gbit/s namespace link, against baselines measured in the same run:
 * - the raw-TCP ceiling with 1, 2 and 4 streams (build/Release/raw_streams: a sending and a
 *   receiving thread per stream, 1 MiB sends from cache, a receiver that discards), and the same
 *   from and into 1 GiB of populated memory (raw_tcp_region: what placing the pages costs);
 * - livemig with 1, 2 and 4 channels on an idle `random` guest: first pass, total, downtime, CPU
 *   seconds of each side (the destination's includes populating its region), and the first
 *   pass per CPU-second of both sides;
 * - `mixed` idle: the share of the region that went on the wire, each of --repeat runs;
 * - the default demo (mixed, 64 MiB/s) --repeat times with encodings on and off, alternating:
 *   slowest/fastest, and each encodings-on run against the encodings-off median.
 *   node dist/bench/channels.js [--link loopback|netns|both] [--runs 3] [--repeat 10] [--size 1GiB]
 * The process runs itself again with UV_THREADPOOL_SIZE=16 when it is not set: 4 channels hold
 * more pool threads than libuv's default of 4 (src/source/channels.ts).
 */
import { execFileSync, spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport, type ReceiverPlace } from '../src/demo/demo.js';
import { emit, machine, median } from './common.js';
import { rawStreams } from './raw.js';
import { createLink, type NetLink } from './netlink.js';

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      link: { type: 'string', default: 'both' },
      runs: { type: 'string', default: '3' },
      repeat: { type: 'string', default: '10' },
      size: { type: 'string', default: String(1 << 30) },
      cases: { type: 'string', default: 'raw,channels,mixed,default' },
    },
  });
  const runs = Number(values.runs);
  const repeat = Number(values.repeat);
  const size = Number(values.size);
  const cases = new Set(values.cases!.split(','));
  const commit = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: path.dirname(fileURLToPath(import.meta.url)) })
    .toString()
    .trim();
  emit({ bench: 'channels', case: 'machine', ...machine(), commit, region_bytes: size });
  if (values.link !== 'netns') await sitting('loopback', undefined, { runs, repeat, size, cases });
  if (values.link !== 'loopback') {
    const link = createLink('1gbit');
    try {
      // through the link the default demo takes ~6 s a run: fewer repeats
      await sitting('1gbit-netns', link, { runs, repeat: Math.min(repeat, 5), size, cases });
    } finally {
      link.remove();
    }
  }
}

interface Sitting {
  runs: number;
  repeat: number;
  size: number;
  cases: Set<string>;
}

const pick = (r: DemoReport): Record<string, unknown> => ({
  first_pass_ms: r.per_round[0]?.duration_ms,
  total_ms: r.total_ms,
  downtime_ms: r.downtime_ms,
  guest_gap_ms: r.guest_gap_ms,
  rounds: r.rounds,
  wire_over_region: +(r.wire_bytes / r.region_bytes).toFixed(4),
  zero_pages: r.zero_pages,
  dup_pages: r.dup_pages,
  lz4_pages: r.lz4_pages,
  cpu_source_s: r.cpu_s.source,
  cpu_destination_s: r.cpu_s.destination,
  channels: r.channels,
  verified: r.verified && r.guest_verified.bad === 0,
});

async function sitting(linkName: string, link: NetLink | undefined, s: Sitting): Promise<void> {
  const at: ReceiverPlace | undefined = link ? { prefix: ['ip', 'netns', 'exec', link.ns], host: link.far, observer: link.near } : undefined;
  const place = at ? { receiverAt: at } : {};
  const g = (content: string, rate: number) => guestSpecOf({ size: s.size, content, rate, pattern: 'uniform', hotSize: 64 << 20 });
  let bestRaw = Number.POSITIVE_INFINITY;
  if (s.cases.has('raw')) {
    // the ceiling (a buffer that stays in cache), then the same from and into populated memory
    for (const [streams, region] of [
      [1, false],
      [2, false],
      [4, false],
      [1, true],
      [2, true],
      [4, true],
    ] as const) {
      const got: Awaited<ReturnType<typeof rawStreams>>[] = [];
      for (let i = 0; i < s.runs; i++) got.push(await rawStreams(streams, s.size, link, region));
      const ms = median(got.map((x) => x.ms));
      if (streams > 1 && !region) bestRaw = Math.min(bestRaw, ms);
      emit({
        bench: 'channels',
        link: linkName,
        case: region ? 'raw_tcp_region' : 'raw_tcp',
        streams,
        ms: +ms.toFixed(1),
        range_ms: [Math.min(...got.map((x) => x.ms)), Math.max(...got.map((x) => x.ms))],
        mb_s: Math.round(s.size / 1e3 / ms),
        sender_cpu_s: median(got.map((x) => x.sender_cpu_s)),
        receiver_cpu_s: median(got.map((x) => x.receiver_cpu_s)),
        runs: s.runs,
      });
    }
  }
  if (s.cases.has('channels')) {
    const single: number[] = [];
    for (const channels of [1, 2, 4]) {
      const got: DemoReport[] = [];
      for (let i = 0; i < s.runs; i++) {
        const r = await runDemo({ guest: g('random', 0), downtimeLimitMs: 20, policy: { channels }, ...place });
        got.push(r);
        emit({ bench: 'channels', link: linkName, case: 'livemig_idle_random_run', run: i, ...pick(r) });
      }
      const first = got.map((r) => r.per_round[0]!.duration_ms);
      const cpu = got.map((r) => r.cpu_s.source + r.cpu_s.destination);
      const fp = median(first);
      if (channels === 1) single.push(fp);
      emit({
        bench: 'channels',
        link: linkName,
        case: 'livemig_idle_random',
        channels,
        first_pass_ms: fp,
        first_pass_range_ms: [Math.min(...first), Math.max(...first)],
        mb_s: Math.round(s.size / 1e3 / fp),
        total_ms: median(got.map((r) => r.total_ms)),
        downtime_ms: median(got.map((r) => r.downtime_ms)),
        cpu_source_s: median(got.map((r) => r.cpu_s.source)),
        cpu_destination_s: median(got.map((r) => r.cpu_s.destination)),
        // region bytes per CPU-second of both sides: where more cores take it
        mb_per_cpu_s: Math.round(s.size / 1e6 / median(cpu)),
        vs_one_channel: single.length ? +(single[0]! / fp).toFixed(3) : 1,
        ...(Number.isFinite(bestRaw) ? { vs_best_multi_stream_raw: +(bestRaw / fp).toFixed(3) } : {}),
        verified: got.every((r) => r.verified && r.guest_verified.bad === 0),
        runs: s.runs,
      });
    }
  }
  if (s.cases.has('mixed')) {
    const shares: number[] = [];
    for (let i = 0; i < s.repeat; i++) {
      const r = await runDemo({ guest: g('mixed', 0), ...place });
      shares.push(r.wire_bytes / r.region_bytes);
      emit({ bench: 'channels', link: linkName, case: 'mixed_idle_run', run: i, ...pick(r) });
    }
    emit({
      bench: 'channels',
      link: linkName,
      case: 'mixed_idle',
      wire_over_region_max: +Math.max(...shares).toFixed(4),
      wire_over_region_min: +Math.min(...shares).toFixed(4),
      runs: s.repeat,
    });
  }
  if (s.cases.has('default')) {
    const on: DemoReport[] = [];
    const off: DemoReport[] = [];
    for (let i = 0; i < s.repeat; i++) {
      for (const enc of [true, false]) {
        const r = await runDemo({ guest: g('mixed', 64), ...(enc ? {} : { encodings: { zero: false, dedup: false, compress: false } }), ...place });
        (enc ? on : off).push(r);
        emit({ bench: 'channels', link: linkName, case: 'default_run', encodings: enc, run: i, ...pick(r) });
      }
    }
    const tOn = on.map((r) => r.total_ms);
    const offMedian = median(off.map((r) => r.total_ms));
    emit({
      bench: 'channels',
      link: linkName,
      case: 'default',
      total_ms: median(tOn),
      slowest_over_fastest: +(Math.max(...tOn) / Math.min(...tOn)).toFixed(3),
      encodings_off_median_ms: offMedian,
      slowest_on_over_off_median: +(Math.max(...tOn) / offMedian).toFixed(3),
      downtime_ms: median(on.map((r) => r.downtime_ms)),
      wire_over_region: +median(on.map((r) => r.wire_bytes / r.region_bytes)).toFixed(3),
      lz4_runs: on.filter((r) => r.lz4_pages > 0).length,
      verified: [...on, ...off].every((r) => r.verified && r.guest_verified.bad === 0),
      runs: s.repeat,
    });
  }
}

if (process.env['UV_THREADPOOL_SIZE'] === undefined) {
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, UV_THREADPOOL_SIZE: '16' },
  });
  child.on('exit', (code) => process.exit(code ?? 1));
} else {
  await main();
}
