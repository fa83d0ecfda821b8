/**
 * The destination's disk images: created sparse where the operator said (ReceiveOptions.disks),
 * one per disk the source named, never over a file that exists; written as pages (their blocks
 * follow the memory in the page space); made durable before this side proves the commit; removed
 * if the migration fails before activation (nothing of them ran here).
 */
import { closeSync, constants, fdatasync, ftruncateSync, openSync, unlinkSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { LivemigError } from '../errors.js';
import type { DiskSpec } from './spec.js';

export interface IncomingDisk extends DiskSpec {
  path: string;
  fd: number;
}

const sync = promisify(fdatasync);

/**
 * Creates each image (O_EXCL: an existing file is refused, not overwritten), sparse at its size;
 * where `taken` has an image already (a kept one, src/disk/kept.ts), that one.
 */
export function createDiskImages(dir: string, disks: readonly DiskSpec[], taken: readonly (IncomingDisk | undefined)[] = []): IncomingDisk[] {
  const made: IncomingDisk[] = [];
  try {
    for (const [i, d] of disks.entries()) {
      const kept = taken[i];
      if (kept) {
        made.push(kept);
        continue;
      }
      const file = path.join(dir, `${d.name}.img`);
      let fd: number;
      try {
        fd = openSync(file, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
      } catch (e) {
        throw new LivemigError('ERR_LIVEMIG_REFUSED', `cannot create the image of disk ${d.name} at ${file}: ${(e as Error).message}`, {
          phase: 'reserve',
          cause: e,
        });
      }
      made.push({ ...d, path: file, fd });
      ftruncateSync(fd, d.size);
    }
    return made;
  } catch (e) {
    removeDiskImages(made);
    throw e;
  }
}

/**
 * What a round wrote goes to stable storage behind the transfer (one sync at a time), so that
 * the sync inside the pause has only the last round's blocks left to write.
 */
const behind = new WeakMap<readonly IncomingDisk[], Promise<void>>();

export function syncDisksBehind(disks: readonly IncomingDisk[]): Promise<void> {
  const running = behind.get(disks);
  if (running) return running; // the next round's end starts another
  const p = syncDisks(disks).finally(() => behind.delete(disks));
  behind.set(disks, p);
  return p;
}

/** Every image's writes on stable storage (fdatasync), before this side proves the commit. */
export async function syncDisksFinal(disks: readonly IncomingDisk[]): Promise<void> {
  await behind.get(disks)?.catch(() => undefined);
  await syncDisks(disks);
}

async function syncDisks(disks: readonly IncomingDisk[]): Promise<void> {
  await Promise.all(
    disks.map((d) =>
      sync(d.fd).catch((e: unknown) => {
        throw new LivemigError('ERR_LIVEMIG_SYSCALL', `making disk ${d.name} (${d.path}) durable: ${(e as Error).message}`, { phase: 'commit', cause: e });
      }),
    ),
  );
}

/** The images kept (the guest runs on them): this side's descriptors close. */
export function closeDisks(disks: readonly IncomingDisk[]): void {
  for (const d of disks) closeSync(d.fd);
}

/** A failed migration's images go: none of them ever ran here. */
export function removeDiskImages(disks: readonly IncomingDisk[]): void {
  for (const d of disks) {
    closeSync(d.fd);
    try {
      unlinkSync(d.path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
}
