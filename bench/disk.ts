/**
 * bench/disk: a guest's disk moving with its memory (issue 33, item 11), against the raw ceiling
 * of the same sitting. An 8 GiB sparse image (on XFS made on a loop file, so that writes are
 * tracked by clones) holding 1 GiB of data in 64 KiB..4 MiB extents and 256 MiB of blocks
 * written as zeros, beside a 64 MiB idle memory; loopback, the receiver in this process writing
 * its image on the same filesystem. Each run: bytes on the wire against the data, total time and
 * pause against the raw-TCP ceiling of moving the image's data extents into a file on the same
 * filesystem and making it durable (`raw_streams image:PATH`), measured before each run.
 *   node dist/bench/disk.js [--runs 3] [--disk 8GiB] [--data 1GiB] [--zeros 256MiB]
 * Needs root (a loop mount) and mkfs.xfs.
 */
import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, fdatasyncSync, mkdtempSync, openSync, rmSync, statSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { migrate } from '../src/source/migrate.js';
import { emit, machine, median } from './common.js';
import { rawStreams } from './raw.js';

const MiB = 1 << 20;

/** Data in extents of 64 KiB to 4 MiB spread over the image, then zeros written in 1 MiB pieces between them. */
function makeImage(file: string, size: number, data: number, zeros: number): void {
  const fd = openSync(file, 'w+');
  const chunk = Buffer.alloc(4 * MiB);
  let seed = 42;
  const rand = (): number => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
  let written = 0;
  const stride = Math.floor(size / (data / (2 * MiB)));
  for (let at = 0; written < data && at < size; at += stride) {
    const len = Math.min(data - written, (1 + ((rand() >>> 16) % 64)) * 64 * 1024);
    // each extent its own content: the same bytes twice would go as references
    randomFillSync(chunk, 0, len);
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

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '3' },
      disk: { type: 'string', default: String(8 * 1024) },
      data: { type: 'string', default: '1024' },
      zeros: { type: 'string', default: '256' },
    },
  });
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
    for (let i = 0; i < runs; i++) {
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
  } finally {
    execFileSync('umount', [mnt]);
    rmSync(root, { recursive: true, force: true });
  }
}

await main();
