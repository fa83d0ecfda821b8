/**
 * What this host offers disks, in a directory where images would live (`livemig probe`):
 * cloning files (reflink write tracking), asking where a file's extents lie (FIEMAP), and
 * fanotify pre-content events (disk post-copy). Each tried on a scratch file, never assumed.
 */
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import path from 'node:path';
import { addon } from '../native.js';

export interface DiskFeature {
  feature: 'reflink' | 'extents' | 'precontent';
  available: boolean;
  reason: string;
}

export async function probeDisk(dir: string): Promise<DiskFeature[]> {
  let scratch: string;
  try {
    scratch = mkdtempSync(path.join(dir, '.livemig-probe-'));
  } catch (e) {
    const why = `cannot make a scratch file in ${dir}: ${(e as Error).message}`;
    return (['reflink', 'extents', 'precontent'] as const).map((feature) => ({ feature, available: false, reason: why }));
  }
  const file = path.join(scratch, 'image');
  const fd = openSync(file, 'w+');
  const clone = openSync(path.join(scratch, 'clone'), 'w+');
  try {
    writeSync(fd, Buffer.alloc(1 << 16, 1));
    const out: DiskFeature[] = [];
    out.push(
      await addon.fileCloneAsync(fd, clone).then(
        () => ({ feature: 'reflink' as const, available: true, reason: `${dir}'s filesystem clones files (FICLONE): disks are tracked by comparing clones` }),
        (e: Error) => ({
          feature: 'reflink' as const,
          available: false,
          reason: `no clone here (${e.message}): disks are tracked by hashing every block each round`,
        }),
      ),
    );
    out.push(
      await addon.fileExtentsAsync(fd).then(
        (e) => ({
          feature: 'extents' as const,
          available: e.length > 0,
          reason: e.length > 0 ? 'FIEMAP says where a file’s extents lie' : 'FIEMAP answered no extent for written data',
        }),
        (e: Error) => ({ feature: 'extents' as const, available: false, reason: `no FIEMAP here (${e.message})` }),
      ),
    );
    try {
      addon.precontentUnwatch(addon.precontentWatch(file));
      out.push({ feature: 'precontent', available: true, reason: 'fanotify pre-content events: a disk can follow its guest by post-copy' });
    } catch (e) {
      out.push({ feature: 'precontent', available: false, reason: `no fanotify pre-content events (${(e as Error).message}): disks move by pre-copy only` });
    }
    return out;
  } finally {
    closeSync(fd);
    closeSync(clone);
    rmSync(scratch, { recursive: true, force: true });
  }
}

/**
 * Why disks cannot follow their guest by post-copy into `dir` (undefined: they can): a scratch
 * file there is marked for fanotify pre-content events, and the kernel's refusal is the reason.
 */
export function precontentRefusal(dir: string): string | undefined {
  let scratch: string | undefined;
  try {
    scratch = mkdtempSync(path.join(dir, '.livemig-probe-'));
    const file = path.join(scratch, 'image');
    closeSync(openSync(file, 'w'));
    addon.precontentUnwatch(addon.precontentWatch(file));
    return undefined;
  } catch (e) {
    return `no fanotify pre-content events in ${dir} (${(e as Error).message}; Linux >= 6.14 and CAP_SYS_ADMIN needed)`;
  } finally {
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  }
}
