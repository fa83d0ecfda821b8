/**
 * bench/disk: a guest's disk moving with its memory (issue 33, item 11), against the raw ceiling
 * of the same sitting. An 8 GiB sparse image (on XFS made on a loop file, so that writes are
 * tracked by clones) holding 1 GiB of data in 64 KiB..4 MiB extents and 256 MiB of blocks
 * written as zeros, beside a 64 MiB idle memory; loopback, the receiver in this process writing
 * its image on the same filesystem. Each run: bytes on the wire against the data, total time and
 * pause against the raw-TCP ceiling of moving the image's data extents into a file on the same
 * filesystem and making it durable (`raw_streams image:PATH`), measured before each run.
 * Then `retry`: a migration cancelled once half the data went, and the same guest migrated again
 * to the same receiver (which kept the images, --keep-disks): the bytes sent again for blocks the
 * destination already held. Then `compression`, through a 1 Gbit/s namespace link to a receiver
 * process there (bench/disk-receiver.ts), the image's data half text-like: bytes and time with LZ4 on and off.
 *   node dist/bench/disk.js [--runs 3] [--disk 8GiB] [--data 1GiB] [--zeros 256MiB] [--cases idle,retry,compression]
 * Needs root (a loop mount, a namespace link) and mkfs.xfs.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { randomFillSync } from 'node:crypto';
import { closeSync, fdatasyncSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { migrate } from '../src/source/migrate.js';
import { MigrationControl } from '../src/source/types.js';
import { createLink, type NetLink } from './netlink.js';
import { emit, machine, median } from './common.js';
import { rawStreams } from './raw.js';

const MiB = 1 << 20;
const RECEIVER = fileURLToPath(new URL('./disk-receiver.js', import.meta.url));

/** Text-like bytes (words from a small vocabulary, as logs and source files are): LZ4 takes them to about a third. */
function fillText(buf: Buffer, len: number, seed: number): void {
  const words = ['migration', 'block', 'the', 'guest', 'page', 'round', 'of', 'and', 'disk', 'memory', 'pause', 'link', 'copy', 'a', 'to'];
  // xorshift32 in 32-bit integers: the LCG of makeImage, in doubles, loses its low bits past 2^53
  // and falls into a short cycle, whose pages repeat and go as references instead of compressed
  let x = seed | 1;
  const next = (): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
  for (let at = 0; at < len;) {
    const w = words[next() % words.length]!;
    at += buf.write(w + (next() % 7 === 0 ? '\n' : ' '), at, Math.min(len - at, w.length + 1), 'latin1');
  }
}

/**
 * Data in extents of 64 KiB to 4 MiB spread over the image, then zeros written in 1 MiB pieces
 * between them. `text`: the share of extents that hold text-like bytes (the rest random).
 */
function makeImage(file: string, size: number, data: number, zeros: number, text = 0): void {
  const fd = openSync(file, 'w+');
  const chunk = Buffer.alloc(4 * MiB);
  let seed = 42;
  const rand = (): number => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
  let written = 0;
  const stride = Math.floor(size / (data / (2 * MiB)));
  for (let at = 0; written < data && at < size; at += stride) {
    const len = Math.min(data - written, (1 + ((rand() >>> 16) % 64)) * 64 * 1024);
    // each extent its own content: the same bytes twice would go as references
    if ((rand() % 100) / 100 < text) fillText(chunk, len, rand() ^ written);
    else randomFillSync(chunk, 0, len);
    writeSync(fd, chunk, 0, len, at);
    written += len;
  }
  const zero = Buffer.alloc(MiB);
  for (let z = 0, at = stride / 2; z < zeros; z += MiB, at += stride) writeSync(fd, zero, 0, MiB, Math.floor(at / MiB) * MiB);
  writeSync(fd, Buffer.alloc(1), 0, 1, size - 1);
  fdatasyncSync(fd);
  closeSync(fd);
}

async function once(dir: string, size: number): Promise<Record<string, number | boolean | string>> {
  const file = path.join(dir, 'src', 'disk.img');
  const dest = path.join(dir, 'dst');
  rmSync(dest, { recursive: true, force: true });
  execFileSync('mkdir', ['-p', dest]);
  const memory = Region.create(64 * MiB, { name: 'bench-disk' });
  memory.view().fill(7, 0, 16 * MiB);
  const fd = openSync(file, 'r');
  const rx = await listen('127.0.0.1', 0, { disks: { dir: dest }, activate: async () => undefined });
  try {
    const r = await migrate({
      region: memory,
      to: { host: '127.0.0.1', port: rx.port },
      disks: [{ name: 'root', fd, path: file, size }],
      pause: async () => new Uint8Array(0),
      resume: async () => undefined,
    });
    await rx.next();
    return {
      verified: r.verified,
      total_ms: r.total_ms,
      prep_ms: r.prep_ms,
      downtime_ms: r.downtime_ms,
      wire_mib: +(r.wire_bytes / MiB).toFixed(1),
      pages_sent: r.pages_sent,
      hole_pages: r.hole_pages,
      zero_pages: r.zero_pages,
      tracker_reason: r.tracker_reason,
      dest_allocated_mib: +((statSync(path.join(dest, 'root.img')).blocks * 512) / MiB).toFixed(1),
    };
  } finally {
    await rx.close();
    closeSync(fd);
    memory.release();
  }
}

/**
 * A migration cancelled once half the data went, then the same guest migrated again: the
 * receiver kept the images (keepMs), the retry sends what the destination does not hold yet.
 */
async function retry(dir: string, size: number, data: number): Promise<Record<string, number | boolean | string>> {
  const file = path.join(dir, 'src', 'disk.img');
  const dest = path.join(dir, 'dst-retry');
  rmSync(dest, { recursive: true, force: true });
  execFileSync('mkdir', ['-p', dest]);
  const memory = Region.create(64 * MiB, { name: 'bench-disk-retry' });
  const fd = openSync(file, 'r');
  const rx = await listen('127.0.0.1', 0, { disks: { dir: dest, keepMs: 600_000 }, activate: async () => undefined });
  const base = {
    region: memory,
    to: { host: '127.0.0.1', port: rx.port },
    disks: [{ name: 'root', fd, path: file, size }],
    guestName: 'bench-retry',
    pause: async () => new Uint8Array(0),
    resume: async () => undefined,
  };
  try {
    const control = new MigrationControl();
    const cut = setInterval(() => {
      const s = control.status();
      if (s && s.bytes_sent >= data / 2) {
        clearInterval(cut);
        control.cancel();
      }
    }, 5);
    const failed = rx.next();
    failed.catch(() => undefined);
    const first = await migrate({ ...base, control }).then(
      () => 'completed',
      (e: { code?: string }) => e.code ?? 'failed',
    );
    clearInterval(cut);
    await failed.catch(() => undefined);
    const keptFile = path.join(dest, 'root.img.partial');
    const held = statSync(keptFile).blocks * 512;
    const done = rx.next();
    const r = await migrate(base);
    await done;
    // blocks not yet there must go; what went beyond them was sent again
    const resent = Math.max(0, r.wire_bytes - Math.max(0, data - held));
    return {
      first_try: first,
      held_mib: +(held / MiB).toFixed(1),
      retry_wire_mib: +(r.wire_bytes / MiB).toFixed(1),
      retry_skipped_pages: r.skipped_pages,
      resent_mib: +(resent / MiB).toFixed(1),
      resent_over_image: +(resent / size).toFixed(4),
      retry_total_ms: r.total_ms,
      verified: r.verified,
    };
  } finally {
    await rx.close();
    closeSync(fd);
    memory.release();
  }
}

/** Through the link, to a receiver in the namespace (bench/disk-receiver.ts): the image moved with LZ4 on or off. */
async function overLink(dir: string, size: number, link: NetLink, compress: boolean): Promise<Record<string, number | boolean | string>> {
  const file = path.join(dir, 'src-text', 'disk.img');
  const dest = path.join(dir, `dst-link-${compress ? 'lz4' : 'plain'}`);
  rmSync(dest, { recursive: true, force: true });
  execFileSync('mkdir', ['-p', dest]);
  const rx = spawn('ip', ['netns', 'exec', link.ns, process.execPath, RECEIVER, link.far, dest], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: rx.stdout! })[Symbol.asyncIterator]();
  const memory = Region.create(64 * MiB, { name: 'bench-disk-link' });
  const fd = openSync(file, 'r');
  try {
    const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
    const r = await migrate({
      region: memory,
      to: { host: link.far, port },
      insecure: true,
      disks: [{ name: 'root', fd, path: file, size }],
      encodings: { zero: true, dedup: true, compress },
      pause: async () => new Uint8Array(0),
      resume: async () => undefined,
    });
    return {
      compress,
      verified: r.verified,
      total_ms: r.total_ms,
      wire_mib: +(r.wire_bytes / MiB).toFixed(1),
      zero_pages: r.zero_pages,
      dup_pages: r.dup_pages,
      raw_pages: r.raw_pages,
      lz4_pages: r.lz4_pages,
      lz4_ratio: r.lz4_ratio,
    };
  } finally {
    rx.kill();
    closeSync(fd);
    memory.release();
  }
}

/** The idle runs' medians and ranges, against the ceilings measured beside them. */
function emitIdleSummary(got: Record<string, number | boolean | string>[], ceiling: number[], runs: number, data: number): void {
  const totals = got.map((r) => r['total_ms'] as number);
  const wire = got.map((r) => r['wire_mib'] as number);
  emit({
    bench: 'disk',
    case: 'summary',
    runs,
    total_ms: median(totals),
    total_range: [Math.min(...totals), Math.max(...totals)],
    raw_ms: median(ceiling),
    raw_range: [Math.min(...ceiling), Math.max(...ceiling)],
    // the ceiling's time over ours: 1.0 is the ceiling's speed
    speed_over_raw: +(median(ceiling) / median(totals)).toFixed(2),
    speed_over_raw_each: got.map((r, i) => +(ceiling[i]! / (r['total_ms'] as number)).toFixed(2)),
    wire_over_data: +(median(wire) / (data / MiB)).toFixed(3),
    verified: got.every((r) => r['verified']),
  });
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      disk: { type: 'string', default: String(8 * 1024) },
      data: { type: 'string', default: '1024' },
      zeros: { type: 'string', default: '256' },
      cases: { type: 'string', default: 'idle,retry,compression' },
    },
  });
  const cases = values.cases.split(',');
  const runs = Number(values.runs);
  const size = Number(values.disk) * MiB;
  const data = Number(values.data) * MiB;
  const zeros = Number(values.zeros) * MiB;
  const root = mkdtempSync(path.join(tmpdir(), 'livemig-bench-disk-'));
  const backing = path.join(root, 'fs.img');
  const mnt = path.join(root, 'mnt');
  execFileSync('truncate', ['-s', `${Math.ceil((3 * size) / MiB)}M`, backing]);
  execFileSync('mkfs.xfs', ['-q', '-m', 'reflink=1', backing]);
  execFileSync('mkdir', [mnt]);
  execFileSync('mount', ['-o', 'loop', backing, mnt]);
  try {
    emit({ bench: 'disk', case: 'machine', ...machine(), disk_bytes: size, data_bytes: data, zero_bytes: zeros });
    execFileSync('mkdir', ['-p', path.join(mnt, 'src')]);
    makeImage(path.join(mnt, 'src', 'disk.img'), size, data, zeros);
    const ceiling: number[] = [];
    const got: Record<string, number | boolean | string>[] = [];
    for (let i = 0; i < (cases.includes('idle') ? runs : 0); i++) {
      const ceilingImage = path.join(mnt, 'raw-dest.img');
      const raw = async (): Promise<number> => {
        const ms = (await rawStreams(1, size, undefined, { image: { from: path.join(mnt, 'src', 'disk.img'), to: ceilingImage } })).ms;
        rmSync(ceilingImage, { force: true });
        return ms;
      };
      // in turn first: the first to write a gigabyte of fresh page cache pays the host's first touches
      let r: Record<string, number | boolean | string>;
      if (i % 2 === 0) {
        ceiling.push(await raw());
        r = await once(mnt, size);
      } else {
        r = await once(mnt, size);
        ceiling.push(await raw());
      }
      got.push(r);
      emit({ bench: 'disk', case: 'run', run: i + 1, first: i % 2 === 0 ? 'raw' : 'livemig', raw_image_ms: ceiling[i], ...r });
    }
    if (got.length) emitIdleSummary(got, ceiling, runs, data);
    for (let i = 0; i < (cases.includes('retry') ? runs : 0); i++) emit({ bench: 'disk', case: 'retry', run: i + 1, ...(await retry(mnt, size, data)) });
    if (cases.includes('compression')) {
      execFileSync('mkdir', ['-p', path.join(mnt, 'src-text')]);
      makeImage(path.join(mnt, 'src-text', 'disk.img'), size, data, zeros, 0.5);
      const link = createLink('1gbit');
      try {
        for (let i = 0; i < runs; i++)
          for (const compress of i % 2 === 0 ? [true, false] : [false, true])
            emit({ bench: 'disk', case: 'compression', link: '1gbit', run: i + 1, ...(await overLink(mnt, size, link, compress)) });
      } finally {
        link.remove();
      }
    }
  } finally {
    execFileSync('umount', [mnt]);
    rmSync(root, { recursive: true, force: true });
  }
}

await main();
