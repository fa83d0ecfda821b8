/**
 * A failed or cancelled migration's disk images, kept at the destination for a time the
 * operator sets (ReceiveOptions.disks.keepMs; `--keep-disks`), so that the next migration of
 * the same guest here sends only the blocks that differ (issue 33, item 7), as a kept memory
 * image does (`--reuse-image`). An image is kept as DIR/NAME.img.partial beside a note
 * (NAME.img.partial.json: the guest, the size, when it expires); the next migration of that
 * guest with a disk of that name and size takes it back as DIR/NAME.img, and the source learns
 * its blocks' hashes in IMAGE_HASHES: a block whose content is already there is not sent. What
 * the image holds is never trusted: it is hashed when taken, and the commitment digest covers
 * every block. An expired image is removed when the directory is next used.
 */
import { closeSync, constants, existsSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { addon, callAsync } from '../native.js';
import type { PageExtents } from '../pages/extents.js';
import type { IncomingDisk } from './incoming.js';
import type { DiskSpec } from './spec.js';

const PARTIAL = '.partial';
const NOTE = '.partial.json';

interface KeptNote {
  guest: string;
  size: number;
  /** ms since the epoch */
  expires: number;
}

function readNote(file: string): KeptNote | undefined {
  try {
    const o = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    if (typeof o.guest !== 'string' || !Number.isSafeInteger(o.size) || !Number.isFinite(o.expires)) return undefined;
    return { guest: o.guest, size: o.size as number, expires: o.expires as number };
  } catch {
    return undefined; // unreadable: not a note of ours, its image is not taken
  }
}

/** Removes the kept images of `dir` that expired (or whose note is unreadable). */
export function sweepKeptImages(dir: string, now = Date.now()): void {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return; // the directory is checked where it is used
  }
  for (const n of names) {
    if (!n.endsWith(NOTE)) continue;
    const note = readNote(path.join(dir, n));
    if (note && note.expires > now) continue;
    rmSync(path.join(dir, n.slice(0, -NOTE.length + PARTIAL.length)), { force: true });
    rmSync(path.join(dir, n), { force: true });
  }
}

/**
 * Keeps the images of a migration that failed before the guest ran here: closed, renamed to
 * NAME.img.partial beside their note. An image kept before under that name is replaced.
 */
export function keepDiskImages(disks: readonly IncomingDisk[], guest: string, keepMs: number): void {
  for (const d of disks) {
    closeSync(d.fd);
    const kept = d.path + PARTIAL;
    renameSync(d.path, kept);
    writeFileSync(d.path + NOTE, JSON.stringify({ guest, size: d.size, expires: Date.now() + keepMs } satisfies KeptNote), { mode: 0o600 });
  }
}

/**
 * For each disk, the image kept for this guest under its name and size, taken back as
 * DIR/NAME.img (opened read-write), or undefined where there is none. Expired images go first.
 */
export function takeKeptImages(dir: string, guest: string | undefined, disks: readonly DiskSpec[]): (IncomingDisk | undefined)[] {
  sweepKeptImages(dir);
  return disks.map((d) => {
    const file = path.join(dir, `${d.name}.img`);
    const note = guest === undefined ? undefined : readNote(file + NOTE);
    if (!note || note.guest !== guest || note.size !== d.size || existsSync(file)) return undefined;
    try {
      renameSync(file + PARTIAL, file);
    } catch {
      return undefined; // the note without its image: nothing to take
    }
    rmSync(file + NOTE, { force: true });
    let fd: number;
    try {
      fd = openSync(file, constants.O_RDWR);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_REFUSED', `cannot open the kept image of disk ${d.name} at ${file}: ${(e as Error).message}`, {
        phase: 'reserve',
        cause: e,
      });
    }
    return { ...d, path: file, fd };
  });
}

/**
 * The hash of every block a kept image holds data in, into `hashes` (its holes read as zeros:
 * the zero page's hash, already there). `data`: where the image holds data, as extents of the
 * page space, whose page `firstPage` is the image's first block.
 */
export async function hashKeptImage(fd: number, data: PageExtents, hashes: BigUint64Array, firstPage: number): Promise<void> {
  for (let i = 0; i < data.length; i += 2) {
    for (let p = data[i]!; p < data[i + 1]!; p += 1 << 16) {
      const n = Math.min(1 << 16, data[i + 1]! - p);
      const h = await callAsync('ERR_LIVEMIG_SYSCALL', 'reserve', 'hashing a kept disk image', () => addon.hashFileBlocksAsync(fd, 4096, p - firstPage, n));
      hashes.set(h, p);
    }
  }
}
