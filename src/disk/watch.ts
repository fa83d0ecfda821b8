/**
 * Disk post-copy at the destination (issue 33, item 6). The images are marked for fanotify
 * pre-content events when they are created, before anything opens them for the guest: the
 * kernel decides at open whether a file's accesses raise such events, so a descriptor opened
 * before the mark would never wait. Once the guest runs here by post-copy, every read or write
 * of its images waits for an answer from the fault service's thread (native/postcopy/
 * disk_waits.h), which lets it on once the blocks it touches have arrived. livemig's own writes
 * go through a descriptor of each image that raises no event (one the kernel opened for an
 * event of our own), or they would wait on themselves. A guest that runs here by pre-copy gets
 * its images with the marks gone.
 */
import { closeSync, constants, fstatSync, openSync, read } from 'node:fs';
import { LivemigError } from '../errors.js';
import { addon, call, callAsync, type PostcopyDiskRange } from '../native.js';
import type { IncomingDisk } from './incoming.js';

export interface WatchedImages {
  /** the fanotify descriptor every image is marked on */
  fanotify: number;
  /** per image, a descriptor whose reads and writes raise no event: livemig's own */
  quiet: number[];
  /** where each disk lies in a page space whose memory has `memoryPages` pages, and which file it is */
  ranges(memoryPages: number): PostcopyDiskRange[];
  /**
   * The marks go: accesses no longer wait (every block is here, or the guest runs by pre-copy).
   * They go through at once; the promise settles when the group is torn down (off this thread:
   * the teardown waits for a grace period, milliseconds)
   */
  close(): Promise<void>;
}

/** how long to wait for the events of our own reads (each image's quiet descriptor) */
const QUIET_WAIT_MS = 5_000;

/**
 * Marks the images just created and opens them again (each disk's fd is replaced: the old one
 * predates the mark), then takes a quiet descriptor of each.
 */
export async function watchImages(disks: IncomingDisk[]): Promise<WatchedImages> {
  let fan = -1;
  let quiet: number[] = [];
  try {
    for (const d of disks)
      fan = call('ERR_LIVEMIG_UNSUPPORTED', 'reserve', `watching ${d.path} for pre-content access (fanotify, Linux >= 6.14)`, () =>
        fan < 0 ? addon.precontentWatch(d.path) : addon.precontentWatch(d.path, fan),
      );
    for (const d of disks) {
      const fd = openSync(d.path, constants.O_RDWR);
      closeSync(d.fd);
      d.fd = fd;
    }
    quiet = await quietDescriptors(fan, disks);
  } catch (e) {
    if (fan >= 0) addon.precontentUnwatch(fan);
    throw e;
  }
  const ids = disks.map((d) => {
    const st = fstatSync(d.fd);
    return { dev: st.dev, ino: st.ino };
  });
  let open = true;
  return {
    fanotify: fan,
    quiet,
    ranges: (memoryPages) => {
      let first = memoryPages;
      return disks.map((d, i) => {
        const r = { firstPage: first, pages: d.size / 4096, ...ids[i]! };
        first += r.pages;
        return r;
      });
    },
    close: () => {
      if (!open) return Promise.resolve();
      open = false;
      for (const q of quiet) closeSync(q);
      return callAsync('ERR_LIVEMIG_SYSCALL', 'activate', 'unwatching the disk images', () => addon.precontentUnwatchAsync(fan));
    },
  };
}

/** A descriptor per image that raises no event: the one the kernel opened for a read of our own. */
async function quietDescriptors(fan: number, disks: readonly IncomingDisk[]): Promise<number[]> {
  const ids = disks.map((d) => fstatSync(d.fd));
  const quiet: (number | undefined)[] = disks.map(() => undefined);
  // each read waits on its event, answered below
  const reads = disks.map((d) => {
    const fd = openSync(d.path, 'r');
    return new Promise<void>((resolve, reject) => read(fd, Buffer.alloc(1), 0, 1, 0, (e) => (closeSync(fd), e ? reject(e) : resolve())));
  });
  const deadline = performance.now() + QUIET_WAIT_MS;
  try {
    while (quiet.some((q) => q === undefined)) {
      if (performance.now() > deadline)
        throw new LivemigError('ERR_LIVEMIG_SYSCALL', `no pre-content event for our own read of a disk image within ${QUIET_WAIT_MS} ms`, { phase: 'reserve' });
      const events = await callAsync('ERR_LIVEMIG_SYSCALL', 'reserve', 'reading pre-content events', () => addon.precontentNextAsync(fan, 100));
      for (const e of events) {
        const st = fstatSync(e.fd);
        const i = ids.findIndex((id) => id.dev === st.dev && id.ino === st.ino);
        if (i >= 0 && quiet[i] === undefined) quiet[i] = call('ERR_LIVEMIG_SYSCALL', 'reserve', 'keeping a quiet descriptor', () => addon.unixDup(e.fd));
        // nothing but our reads touches the images yet: every access goes on
        addon.precontentRespond(fan, e.fd, true);
      }
    }
    await Promise.all(reads);
    return quiet as number[];
  } catch (e) {
    for (const q of quiet) if (q !== undefined) closeSync(q);
    throw e;
  }
}
