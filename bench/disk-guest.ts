/**
 * bench/disk-guest: a running guest's disk moving with it (issue 33, item 11), the reference
 * guest through `livemig receive` (bench/disk is the idle image through the library). Cases:
 * - pause: the same 256 MiB guest writing 16 MiB/s of memory, migrated without a disk, with a
 *   1 GiB disk left idle, and with the disk written at 20 MB/s of random 4 KiB blocks; the
 *   pause of each against the memory-only pause of the same sitting (every block checked);
 * - postcopy: the guest runs at the destination by post-copy (its push capped so that blocks
 *   stay missing) while this process reads random 64 KiB of its image there: how long a read of
 *   missing blocks waits, from the reader's side and as the fault service counted it; the images
 *   on XFS or ext4 made on a loop file, or on the host's own filesystem (`--fs xfs,ext4,host`),
 *   mounted with `--mount-options` (e.g. lazytime: no timestamp written per write);
 * - throttle: the disk written faster than a 1 Gbit/s link carries: the pause against the
 *   downtime limit and the total against --deadline.
 *   node dist/bench/disk-guest.js [--runs 3] [--cases pause,postcopy,throttle] [--link loopback,1gbit]
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { runDemo, type DemoReport, type GuestSpec, type ReceiverPlace } from '../src/demo/demo.js';
import { percentile } from '../src/postcopy/dest.js';
import { Region } from '../src/region/region.js';
import { emit, machine, median } from './common.js';
import { receiverPlace } from './netlink.js';

const MiB = 1 << 20;
const GUEST: GuestSpec = { size: 256 * MiB, content: 'mixed', rate: 16, pattern: 'uniform', hotSize: 64 * MiB };
const DISK = 1024 * MiB;

const range = (xs: number[]): [number, number] => [Math.min(...xs), Math.max(...xs)];

function sample(r: DemoReport): Record<string, unknown> {
  return {
    verified: r.verified,
    downtime_ms: r.downtime_ms,
    guest_downtime_ms: r.guest_downtime_ms,
    total_ms: r.total_ms,
    rounds: r.rounds,
    stop_pages: r.stop_and_copy?.pages,
    commit_ms: r.stop_and_copy?.commit_ms,
    disk_writes: r.guest_verified.disk?.writes,
    disk_bad: r.guest_verified.disk?.bad,
  };
}

async function pauseCase(runs: number, at: ReceiverPlace, link: string): Promise<void> {
  const kinds = [
    { kind: 'memory-only', guest: GUEST },
    { kind: 'disk-idle', guest: { ...GUEST, disk: { size: DISK, rate: 0 } } },
    { kind: 'disk-20MBps', guest: { ...GUEST, disk: { size: DISK, rate: 20 } } },
  ];
  const got = new Map<string, DemoReport[]>(kinds.map((k) => [k.kind, []]));
  for (let i = 0; i < runs; i++) {
    // interleaved: each kind sees the host as the others do in that minute
    for (const k of kinds) {
      const r = await runDemo({ guest: k.guest, receiverAt: at });
      got.get(k.kind)!.push(r);
      emit({ bench: 'disk-guest', case: 'pause', link, kind: k.kind, run: i + 1, ...sample(r) });
    }
  }
  const base = median(got.get('memory-only')!.map((r) => r.downtime_ms));
  for (const k of kinds) {
    const d = got.get(k.kind)!.map((r) => r.downtime_ms);
    emit({
      bench: 'disk-guest',
      case: 'pause-summary',
      link,
      kind: k.kind,
      runs,
      downtime_ms: median(d),
      downtime_range: range(d),
      over_memory_only_ms: +(median(d) - base).toFixed(2),
      over_memory_only_each_ms: d.map((x) => +(x - base).toFixed(2)),
      verified: got.get(k.kind)!.every((r) => r.verified),
    });
  }
}

/**
 * Random 64 KiB reads of the destination's image, where the source's image holds data (a read
 * of a hole there waits for nothing), until stopped: each one's wait, ms, and apart the waits of
 * the first read of each piece (the reads that may have waited for blocks to come).
 */
function reader(file: string, source: string, size: number): { stop(): Promise<{ all: number[]; first: number[] }> } {
  const waits: number[] = [];
  const first: number[] = [];
  const seen = new Set<number>();
  let stopped = false;
  const loop = (async () => {
    const src = openSync(source, 'r+');
    const image = Region.adopt(src, size);
    const data = await image.dataExtents();
    image.release();
    closeSync(src);
    // 64 KiB pieces (16 blocks) that start in the data
    const starts: number[] = [];
    for (let i = 0; i < data.length; i += 2) for (let b = Math.ceil(data[i]! / 16) * 16; b < data[i + 1]!; b += 16) starts.push(b * 4096);
    const fh = await open(file, 'r');
    const buf = Buffer.alloc(64 * 1024);
    try {
      while (!stopped && starts.length) {
        const at = starts[Math.floor(Math.random() * starts.length)]!;
        const t0 = performance.now();
        await fh.read(buf, 0, buf.length, at);
        const ms = performance.now() - t0;
        waits.push(ms);
        if (!seen.has(at)) first.push(ms);
        seen.add(at);
      }
    } finally {
      await fh.close();
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
      return { all: waits, first };
    },
  };
}

/** A filesystem for the images: XFS or ext4 made on a loop file (root, mkfs.xfs, mkfs.ext4), or the host's own (tmpdir). */
function imagesOn(fs: string, mountOptions: string): { dir: string; remove(): void } {
  const root = mkdtempSync(path.join(tmpdir(), 'livemig-bench-fs-'));
  if (fs === 'host') return { dir: root, remove: () => rmSync(root, { recursive: true, force: true }) };
  const mnt = path.join(root, 'mnt');
  execFileSync('truncate', ['-s', '8G', path.join(root, 'fs.img')]);
  execFileSync(`mkfs.${fs}`, ['-q', ...(fs === 'ext4' ? ['-F'] : []), path.join(root, 'fs.img')]);
  execFileSync('mkdir', [mnt]);
  execFileSync('mount', ['-o', `loop${mountOptions ? `,${mountOptions}` : ''}`, path.join(root, 'fs.img'), mnt]);
  return {
    dir: mnt,
    remove: () => {
      execFileSync('umount', [mnt]);
      rmSync(root, { recursive: true, force: true });
    },
  };
}

async function postcopyCase(runs: number, at: ReceiverPlace, link: string, fs: string, mountOptions: string, prealloc: string): Promise<void> {
  const on = imagesOn(fs, mountOptions);
  try {
    for (let i = 0; i < runs; i++)
      for (const pre of prealloc === 'both' ? [i % 2 === 0, i % 2 !== 0] : [prealloc === 'on']) await postcopyRun(i, at, link, fs, on.dir, mountOptions, pre);
  } finally {
    on.remove();
  }
}

async function postcopyRun(i: number, at: ReceiverPlace, link: string, fs: string, under: string, mountOptions: string, prealloc: boolean): Promise<void> {
  const dir = mkdtempSync(path.join(under, 'livemig-bench-dpc-'));
  let r: ReturnType<typeof reader> | undefined;
  try {
    const report = await runDemo({
      // the guest leaves its disk alone: the waits counted are this reader's
      guest: { ...GUEST, rate: 4, disk: { size: DISK, rate: 0 } },
      receiverAt: at,
      diskDir: dir,
      ...(prealloc ? { receiverArgs: ['--prealloc'] } : {}),
      policy: { mode: 'postcopy', postcopyBandwidthMiBps: 64 },
      onProgress: (e) => {
        if (e.type === 'postcopy' && !r) r = reader(path.join(dir, 'destination', 'disk0.img'), path.join(dir, 'source.img'), DISK);
      },
    });
    const { all, first } = (await r?.stop()) ?? { all: [], first: [] };
    const sorted = Float64Array.from(all).sort();
    const cold = Float64Array.from(first).sort();
    const dp = report.destination_postcopy ?? {};
    emit({
      bench: 'disk-guest',
      case: 'postcopy-read-64k',
      link,
      fs,
      mount_options: mountOptions,
      prealloc,
      run: i + 1,
      verified: report.verified,
      disk_bad: report.guest_verified.disk?.bad,
      reads: all.length,
      read_p50_ms: +percentile(sorted, 0.5).toFixed(3),
      read_p99_ms: +percentile(sorted, 0.99).toFixed(3),
      first_reads: first.length,
      first_read_p50_ms: +percentile(cold, 0.5).toFixed(3),
      first_read_p99_ms: +percentile(cold, 0.99).toFixed(3),
      first_read_max_ms: +(cold.at(-1) ?? 0).toFixed(3),
      accesses_waited: dp['disk_accesses_waited'],
      service_wait_p50_us: dp['disk_wait_p50_us'],
      service_wait_p99_us: dp['disk_wait_p99_us'],
      postcopy_total_ms: report.total_ms,
    });
  } finally {
    await r?.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function throttleCase(runs: number, at: ReceiverPlace, link: string): Promise<void> {
  for (let i = 0; i < runs; i++) {
    const r = await runDemo({
      guest: { ...GUEST, rate: 8, disk: { size: DISK, rate: 300 } },
      receiverAt: at,
      downtimeLimitMs: 50,
      policy: { onStall: 'throttle', deadlineMs: 120_000 },
    });
    emit({
      bench: 'disk-guest',
      case: 'throttle',
      link,
      run: i + 1,
      disk_write_mb_s: 300,
      ...sample(r),
      downtime_limit_met: r.downtime_limit_met,
      max_throttle_percentage: r.max_throttle_percentage,
      deadline_ms: 120_000,
      within_deadline: r.prep_ms + r.total_ms <= 120_000,
      forced_stop: r.forced_stop,
      stop_reason: r.stop_reason,
    });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      cases: { type: 'string', default: 'pause,postcopy,throttle' },
      fs: { type: 'string', default: 'xfs,host' },
      /** for the XFS made here: extra mount options (e.g. lazytime) */
      'mount-options': { type: 'string', default: '' },
      /** post-copy: the receiver with --prealloc (the image's page cache read in before the guest runs), without, or both in turn */
      prealloc: { type: 'string', default: 'off' },
      link: { type: 'string', default: 'loopback,1gbit' },
    },
  });
  const runs = Number(values.runs);
  const cases = values.cases.split(',');
  emit({ bench: 'disk-guest', case: 'machine', ...machine(), guest_bytes: GUEST.size, disk_bytes: DISK });
  for (const linkName of values.link.split(',')) {
    const { link, at } = receiverPlace(linkName);
    try {
      if (cases.includes('pause')) await pauseCase(runs, at, linkName);
      if (cases.includes('postcopy'))
        for (const fs of values.fs.split(',')) await postcopyCase(runs, at, linkName, fs, values['mount-options'], values.prealloc);
      if (cases.includes('throttle') && link) await throttleCase(runs, at, linkName);
    } finally {
      link?.remove();
    }
  }
}

await main();
