/**
 * Which blocks of a disk image were written: a tracker is armed once, then each collect says
 * which blocks were written since the one before (issue 33, item 2). Each backend is exact: a
 * write that completed before a collect began is in that collect's answer or an earlier one.
 * - reflink (XFS, btrfs): the image is cloned at each collect (FICLONE, into an unnamed file
 *   beside it) and the clone's extents are compared with the previous clone's (FIEMAP): a
 *   written block was copied on write to a new place, so its extent differs. The clone is also
 *   a frozen copy to read the written blocks from: no block is read half-written.
 * - hash: every block is hashed at each collect and compared with the hashes before; it reads
 *   the whole image each round, for any file or device.
 * - reported: the VMM marks each block it wrote in a bitmap it shares (lmg_disk_written,
 *   docs/GUEST.md); a collect takes the bitmap's words with an atomic exchange.
 * Block lists are runs, [firstBlock, endBlock, ...] ascending: a disk of 100 GiB has 26M blocks.
 */
import { closeSync, constants, openSync } from 'node:fs';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { addon, callAsync, type WrittenBitmapHandle } from '../native.js';

/** Runs of blocks, [first, end) pairs in ascending order. */
export type BlockRuns = Float64Array;

export interface BlockTracker {
  readonly backend: 'reported' | 'reflink' | 'hash';
  /** why this backend, for the report */
  readonly reason: string;
  /** everything written before this is the baseline */
  arm(): Promise<void>;
  /** the blocks written since arm() or the collect before */
  collect(): Promise<BlockRuns>;
  /**
   * The last collect, the guest paused and its I/O drained: the same blocks, as fast as the
   * backend can tell them (inside the pause); no collect follows it. `sent`: each block's hash
   * as the destination holds it (src/tracking/hash.ts says why a hashing backend needs it).
   */
  collectFinal(sent?: BigUint64Array): Promise<BlockRuns>;
  /** where to read blocks as they were at the last collect (a frozen clone), or the image itself */
  readFd(): number;
  close(): void;
}

export interface DiskImage {
  /** the image, open for reading (and writing, by its VMM) */
  fd: number;
  /** its path: reflink clones go in its directory, on its filesystem */
  path: string;
  /** bytes */
  size: number;
  /** the tracking granularity: a power of two from 4096 to 1 MiB */
  blockSize: number;
  /** the VMM's written-block bitmap (a sealed memfd, a bit per block): the reported backend */
  written?: number;
}

const O_TMPFILE = 0o20000000 | constants.O_DIRECTORY;
const FIEMAP_EXTENT_UNWRITTEN = 0x800;

function blocksOf(d: DiskImage): number {
  return Math.ceil(d.size / d.blockSize);
}

function checkImage(d: DiskImage): void {
  const bs = d.blockSize;
  if (!Number.isInteger(bs) || bs < 4096 || bs > 1 << 20 || (bs & (bs - 1)) !== 0)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `disk blockSize must be a power of two from 4096 to 1 MiB, got ${bs}`, { phase: 'disk' });
  if (!Number.isSafeInteger(d.size) || d.size <= 0)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `disk size must be a positive integer, got ${d.size}`, { phase: 'disk' });
}

/** Appends [first, end) to runs, joining it to the last run when they touch. */
function pushRun(out: number[], first: number, end: number): void {
  if (end <= first) return;
  if (out.length && out[out.length - 1]! >= first) out[out.length - 1] = Math.max(out[out.length - 1]!, end);
  else out.push(first, end);
}

export class HashBlockTracker implements BlockTracker {
  readonly backend = 'hash';
  readonly reason: string;
  readonly #disk: DiskImage;
  #hashes: BigUint64Array | undefined;

  constructor(disk: DiskImage, reason = 'hash: every block hashed each round (reads the whole image)') {
    checkImage(disk);
    this.#disk = disk;
    this.reason = reason;
  }

  async arm(): Promise<void> {
    this.#hashes = await this.#hashAll();
  }

  async collect(): Promise<BlockRuns> {
    if (!this.#hashes) throw new LivemigError('ERR_LIVEMIG_STATE', 'internal: collect before arm', { phase: 'disk' });
    const now = await this.#hashAll();
    const out: number[] = [];
    for (let b = 0; b < now.length; b++) if (now[b] !== this.#hashes[b]) pushRun(out, b, b + 1);
    this.#hashes = now;
    return Float64Array.from(out);
  }

  async collectFinal(sent?: BigUint64Array): Promise<BlockRuns> {
    if (!sent) return this.collect();
    const now = await this.#hashAll();
    if (sent.length !== now.length) return this.collect();
    const out: number[] = [];
    for (let b = 0; b < now.length; b++) if (now[b] !== sent[b]) pushRun(out, b, b + 1);
    this.#hashes = now;
    return Float64Array.from(out);
  }

  readFd(): number {
    return this.#disk.fd;
  }

  close(): void {
    this.#hashes = undefined;
  }

  #hashAll(): Promise<BigUint64Array> {
    const d = this.#disk;
    return callAsync('ERR_LIVEMIG_TRACKING', 'disk', `hashing the blocks of ${d.path}`, () => addon.hashFileBlocksAsync(d.fd, d.blockSize, 0, blocksOf(d)));
  }
}

export class ReflinkBlockTracker implements BlockTracker {
  readonly backend = 'reflink';
  readonly reason: string;
  readonly #disk: DiskImage;
  #clone: number | undefined;
  #extents: Float64Array | undefined;

  constructor(disk: DiskImage, reason = 'reflink: the image is cloned each round and the clones’ extents compared') {
    checkImage(disk);
    this.#disk = disk;
    this.reason = reason;
  }

  async arm(): Promise<void> {
    [this.#clone, this.#extents] = await this.#snapshot();
  }

  async collect(): Promise<BlockRuns> {
    if (this.#clone === undefined || !this.#extents) throw new LivemigError('ERR_LIVEMIG_STATE', 'internal: collect before arm', { phase: 'disk' });
    const [clone, extents] = await this.#snapshot();
    const dirty = changedBlocks(this.#extents, extents, this.#disk.blockSize, this.#disk.size);
    closeSync(this.#clone);
    this.#clone = clone;
    this.#extents = extents;
    return dirty;
  }

  /**
   * No clone inside the pause: the image's own extents against the last clone's say what was
   * written since (a written block was copied away from the extent the clone shares), and with
   * the guest paused the image itself is the frozen copy. Cloning an image of many extents cost
   * most of a pause (bench/RESULTS.md, "bench/disk").
   */
  async collectFinal(): Promise<BlockRuns> {
    if (!this.#extents) throw new LivemigError('ERR_LIVEMIG_STATE', 'internal: collect before arm', { phase: 'disk' });
    const d = this.#disk;
    const now = await callAsync('ERR_LIVEMIG_TRACKING', 'disk', `reading the extents of ${d.path}`, () => addon.fileExtentsAsync(d.fd));
    return changedBlocks(this.#extents, now, d.blockSize, d.size);
  }

  readFd(): number {
    if (this.#clone === undefined) throw new LivemigError('ERR_LIVEMIG_STATE', 'internal: no clone before arm', { phase: 'disk' });
    return this.#clone;
  }

  close(): void {
    if (this.#clone !== undefined) closeSync(this.#clone);
    this.#clone = undefined;
  }

  /** A clone of the image now, unnamed in its directory (gone with its descriptor), and its extents. */
  async #snapshot(): Promise<[number, Float64Array]> {
    const d = this.#disk;
    const fd = openTmpfile(path.dirname(d.path));
    try {
      await callAsync('ERR_LIVEMIG_TRACKING', 'disk', `cloning ${d.path}`, () => addon.fileCloneAsync(d.fd, fd));
      const extents = await callAsync('ERR_LIVEMIG_TRACKING', 'disk', `reading the extents of a clone of ${d.path}`, () => addon.fileExtentsAsync(fd));
      return [fd, extents];
    } catch (e) {
      closeSync(fd);
      throw e;
    }
  }
}

function openTmpfile(dir: string): number {
  try {
    return openSync(dir, O_TMPFILE | constants.O_RDWR, 0o600);
  } catch (e) {
    throw new LivemigError('ERR_LIVEMIG_TRACKING', `cannot make an unnamed file in ${dir} for the image's clones: ${(e as Error).message}`, {
      phase: 'disk',
      cause: e,
    });
  }
}

/**
 * The blocks whose bytes may differ between two clones, from their extents ([logical, physical,
 * length, flags] in bytes): wherever one maps a byte and the other does not, maps it elsewhere,
 * or one says unwritten (reads zero) and the other does not. A block is dirty if any byte is.
 */
export function changedBlocks(before: Float64Array, after: Float64Array, blockSize: number, size: number): BlockRuns {
  // breakpoints of both piecewise mappings, then each piece compared at its start
  const cuts = new Set<number>([0, size]);
  for (const e of [before, after])
    for (let i = 0; i < e.length; i += 4) {
      cuts.add(Math.min(e[i]!, size));
      cuts.add(Math.min(e[i]! + e[i + 2]!, size));
    }
  const points = [...cuts].sort((a, b) => a - b);
  const at = (e: Float64Array, x: number, from: { i: number }): { physical: number; unwritten: boolean } | undefined => {
    while (from.i < e.length && e[from.i]! + e[from.i + 2]! <= x) from.i += 4;
    if (from.i >= e.length || e[from.i]! > x) return undefined;
    return { physical: e[from.i + 1]! + (x - e[from.i]!), unwritten: (e[from.i + 3]! & FIEMAP_EXTENT_UNWRITTEN) !== 0 };
  };
  const out: number[] = [];
  const ib = { i: 0 };
  const ia = { i: 0 };
  for (let k = 0; k + 1 < points.length; k++) {
    const x = points[k]!;
    const y = points[k + 1]!;
    const b = at(before, x, ib);
    const a = at(after, x, ia);
    const same = (!b && !a) || (b !== undefined && a !== undefined && b.physical === a.physical && b.unwritten === a.unwritten);
    if (!same) pushRun(out, Math.floor(x / blockSize), Math.ceil(y / blockSize));
  }
  return Float64Array.from(out);
}

/** The VMM's own account of its writes: exact when it marks each block after the write completed. */
export class ReportedBlockTracker implements BlockTracker {
  readonly backend = 'reported';
  readonly reason = 'reported: the VMM marks the blocks it writes in a bitmap shared with livemig';
  readonly #disk: DiskImage;
  #bitmap: WrittenBitmapHandle | undefined;

  constructor(disk: DiskImage & { written: number }) {
    checkImage(disk);
    if (disk.blockSize !== 4096) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'a reported bitmap counts 4 KiB blocks', { phase: 'disk' });
    this.#disk = disk;
    try {
      this.#bitmap = addon.writtenBitmapOpen(disk.written, blocksOf(disk));
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_HANDOVER', `the written-block bitmap of ${disk.path}: ${(e as Error).message}`, { phase: 'handover', cause: e });
    }
  }

  #take(): BlockRuns {
    if (!this.#bitmap) throw new LivemigError('ERR_LIVEMIG_INTERNAL', 'the written-block bitmap is closed', { phase: 'disk' });
    return addon.writtenBitmapTake(this.#bitmap);
  }

  arm(): Promise<void> {
    this.#take(); // what was written before is sent by the first pass
    return Promise.resolve();
  }
  collect(): Promise<BlockRuns> {
    return Promise.resolve(this.#take());
  }
  collectFinal(): Promise<BlockRuns> {
    return Promise.resolve(this.#take());
  }
  readFd(): number {
    return this.#disk.fd;
  }
  close(): void {
    if (this.#bitmap) addon.writtenBitmapClose(this.#bitmap);
    this.#bitmap = undefined;
  }
}

/**
 * reported when the VMM shares its bitmap; else reflink where the image's filesystem clones
 * (XFS, btrfs: a probe clone is made and dropped), else hash; the reason says which and why, as the memory tracker's does.
 */
export async function chooseBlockTracker(disk: DiskImage): Promise<BlockTracker> {
  checkImage(disk);
  if (disk.written !== undefined) return new ReportedBlockTracker({ ...disk, written: disk.written });
  let fd: number | undefined;
  try {
    fd = openTmpfile(path.dirname(disk.path));
    await addon.fileCloneAsync(disk.fd, fd);
    return new ReflinkBlockTracker(disk, `reflink: ${disk.path}'s filesystem clones files (FICLONE); each round compares two clones' extents`);
  } catch (e) {
    const why = (e as Error).message;
    return new HashBlockTracker(disk, `hash: ${disk.path} cannot be cloned here (${why}); every block is hashed each round, reading the whole image`);
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}
