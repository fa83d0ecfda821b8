/**
 * A guest's disks as the wire and both ends see them: a name and a size each, in order. In the
 * page space a migration moves, the disks follow the guest's memory, each as whole 4 KiB
 * blocks (docs/PROTOCOL.md, "Disks"), so that every block goes through the pages' data path and
 * the commitment digest covers it.
 */
import { GUEST_NAME } from '../guest/layout.js';

export interface DiskSpec {
  /** 1..63 characters of [A-Za-z0-9._-]; the destination's image is DIR/NAME.img */
  name: string;
  /** bytes, a multiple of 4096 */
  size: number;
}

/** A disk at the source: the spec, and the image to read (MigrateOptions.disks). */
export interface SourceDisk extends DiskSpec {
  /** the image (or block device), open for reading */
  fd: number;
  /** where it is: a reflink tracker clones it in its directory */
  path: string;
  /** the VMM's written-block bitmap (contract 4, reported tracking): a sealed memfd, a bit per 4 KiB block */
  written?: number;
  /** why the VMM reports no writes (a QEMU VM's disks), appended to the tracker's reason */
  trackingNote?: string;
}

export const MAX_DISKS = 16;
/** 16 TiB: a disk of more pages than this would not fit a page index beside its memory */
export const MAX_DISK_BYTES = 2 ** 44;
export const DISK_BLOCK = 4096;

/** The disks, checked like any hostile value: `fail(why)` makes the error. */
export function checkDisks(v: unknown, what: string, fail: (why: string) => Error): DiskSpec[] {
  if (!Array.isArray(v) || v.length === 0 || v.length > MAX_DISKS) throw fail(`${what} must be a list of 1 to ${MAX_DISKS} disks`);
  const names = new Set<string>();
  return v.map((d: unknown, i) => {
    const o = d as Record<string, unknown>;
    if (typeof o !== 'object' || o === null) throw fail(`${what} ${i} must be a map`);
    if (typeof o['name'] !== 'string' || !GUEST_NAME.test(o['name'])) throw fail(`${what} ${i}: a name is 1..63 characters of [A-Za-z0-9._-]`);
    if (names.has(o['name'])) throw fail(`${what} ${i}: the name ${o['name']} is taken by another disk`);
    names.add(o['name']);
    const size = o['size'];
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0 || size % DISK_BLOCK !== 0 || size > MAX_DISK_BYTES)
      throw fail(`${what} ${i} (${o['name']}): size must be a positive multiple of ${DISK_BLOCK} bytes, at most ${MAX_DISK_BYTES}`);
    return { name: o['name'], size };
  });
}

export function diskBytes(disks: readonly DiskSpec[] | undefined): number {
  return (disks ?? []).reduce((n, d) => n + d.size, 0);
}
