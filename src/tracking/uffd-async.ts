/**
 * userfaultfd write-protect in async mode (the kernel resolves the write fault itself and
 * marks the page written) plus PAGEMAP_SCAN, which returns the written pages and protects
 * them again in the same page-table walk.
 */
import { LivemigError } from '../errors.js';
import { addon, call, callAsync, closeFd } from '../native.js';
import type { Region } from '../region/region.js';
import { TrackerState } from './state.js';
import type { DirtyTracker, RemoteTarget } from './types.js';

/** The features we ask for: WP_ASYNC is required; the other two widen where it works. */
export function wantedUffdFeatures(available: bigint): bigint {
  let f = addon.UFFD_FEATURE_WP_ASYNC;
  if (available & addon.UFFD_FEATURE_WP_UNPOPULATED) f |= addon.UFFD_FEATURE_WP_UNPOPULATED;
  if (available & addon.UFFD_FEATURE_WP_HUGETLBFS_SHMEM) f |= addon.UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
  return f;
}

export interface WriteProtection {
  /** the userfaultfd; keep it open while tracking lasts */
  readonly uffd: number;
  close(): void;
}

/**
 * Registers this process's mapping of `region` for async write-protect tracking and protects
 * every page. A guest process calls this on its own region before handing it to livemig,
 * which then collects with PAGEMAP_SCAN on /proc/PID/pagemap.
 */
export function protectOwnRegion(region: Pick<Region, 'address' | 'size'>): WriteProtection {
  const features = call('ERR_LIVEMIG_UNSUPPORTED', 'tracking', 'probing userfaultfd', () => addon.uffdProbe());
  if (!(features & addon.UFFD_FEATURE_WP_ASYNC)) {
    throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', 'userfaultfd on this kernel lacks UFFD_FEATURE_WP_ASYNC (Linux >= 6.7 needed)', {
      phase: 'tracking',
    });
  }
  const uffd = call('ERR_LIVEMIG_TRACKING', 'tracking', 'registering the region for write-protect', () =>
    addon.uffdWriteProtect(region.address, region.size, wantedUffdFeatures(features)),
  );
  let open = true;
  return {
    uffd,
    close() {
      if (!open) return;
      open = false;
      closeFd(uffd, 'tracking');
    },
  };
}

export class UffdAsyncTracker implements DirtyTracker {
  readonly backend = 'uffd-async' as const;
  readonly pageCount: number;
  readonly #region: Region;
  readonly #target: RemoteTarget | undefined;
  readonly #state = new TrackerState('uffd-async');
  #protection: WriteProtection | undefined;
  #pagemapFd = -1;
  #address = 0n;

  /**
   * Without `target`, tracks writes through this process's own mapping of `region`.
   * With `target`, tracks writes by another process through its mapping, which that process
   * has registered itself with protectOwnRegion().
   */
  constructor(region: Region, target?: RemoteTarget) {
    this.#region = region;
    this.#target = target;
    this.pageCount = region.pageCount;
  }

  async start(): Promise<void> {
    this.#state.beginStart();
    try {
      if (this.#target) {
        this.#address = this.#target.address;
        this.#pagemapFd = call('ERR_LIVEMIG_TRACKING', 'tracking', `opening /proc/${this.#target.pid}/pagemap`, () => addon.pagemapOpen(this.#target!.pid));
      } else {
        this.#address = this.#region.address;
        this.#protection = protectOwnRegion(this.#region);
        this.#pagemapFd = call('ERR_LIVEMIG_TRACKING', 'tracking', 'opening /proc/self/pagemap', () => addon.pagemapOpen(0));
      }
      // Protect everything now: what was written before start() is not reported.
      this.#scanSync({ rearm: true });
    } catch (e) {
      this.#closeAll();
      throw e;
    }
    this.#state.started();
  }

  collect(): Promise<Uint32Array> {
    // Checked here, not left to the kernel: once unmapped, the address range may already hold
    // another mapping, which PAGEMAP_SCAN would then scan without complaint.
    if (!this.#target && this.#region.released) {
      return Promise.reject(new LivemigError('ERR_LIVEMIG_TRACKING', 'uffd-async tracker: the region was released while tracking', { phase: 'tracking' }));
    }
    const ranges = this.#target?.ranges;
    if (ranges && ranges.length > 1) {
      return this.#state.collecting(async () =>
        joinRanges(
          ranges,
          await Promise.all(
            ranges.map((r) =>
              callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'collecting dirty pages', () =>
                addon.pagemapScan(this.#pagemapFd, r.address, r.pages * this.#region.pageSize, this.#region.pageSize, true),
              ),
            ),
          ),
        ),
      );
    }
    return this.#state.collecting(() =>
      callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'collecting dirty pages', () =>
        addon.pagemapScan(this.#pagemapFd, this.#address, this.#region.size, this.#region.pageSize, true),
      ),
    );
  }

  /**
   * The same as collect(), on the calling thread: for the final collect while the guest is paused.
   * `rearm: false` leaves the pages it reports writable: no write-protection walk and no TLB
   * shoot-down across CPUs inside the pause. Any later collect reports those pages again (a
   * superset: nothing is missed), so only the last collect should skip it.
   */
  collectSync(options: { rearm?: boolean } = {}): Uint32Array {
    if (!this.#state.tracking) throw new LivemigError('ERR_LIVEMIG_STATE', 'uffd-async tracker: collectSync() while not tracking', { phase: 'tracking' });
    return this.#scanSync({ rearm: options.rearm ?? true });
  }

  /**
   * On the calling thread and without re-arming: no write-protection walk and no TLB shoot-down
   * across CPUs inside the pause, and no hop to the thread pool.
   */
  collectFinal(): Uint32Array {
    return this.collectSync({ rearm: false });
  }

  peekWritten(): Promise<number | undefined> {
    if (!this.#target && this.#region.released) return Promise.resolve(undefined);
    const size = this.#region.pageSize;
    const ranges = this.#target?.ranges && this.#target.ranges.length > 1 ? this.#target.ranges : [{ address: this.#address, pages: this.#region.pageCount }];
    return this.#state.peeking(async () => {
      const scans = await Promise.all(
        ranges.map((r) =>
          callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'counting written pages', () =>
            addon.pagemapScan(this.#pagemapFd, r.address, r.pages * size, size, false),
          ),
        ),
      );
      return scans.reduce((n, s) => n + s.length, 0);
    });
  }

  async stop(): Promise<void> {
    if (!this.#state.beginStop()) return;
    await this.#state.quiesce();
    this.#closeAll();
  }

  #scanSync(o: { rearm: boolean }): Uint32Array {
    const { rearm } = o;
    const ranges = this.#target?.ranges;
    if (ranges && ranges.length > 1) {
      const size = this.#region.pageSize;
      return joinRanges(
        ranges,
        ranges.map((r) =>
          call('ERR_LIVEMIG_TRACKING', 'tracking', 'collecting dirty pages', () =>
            addon.pagemapScanSync(this.#pagemapFd, r.address, r.pages * size, size, rearm),
          ),
        ),
      );
    }
    return call('ERR_LIVEMIG_TRACKING', 'tracking', 'collecting dirty pages', () =>
      addon.pagemapScanSync(this.#pagemapFd, this.#address, this.#region.size, this.#region.pageSize, rearm),
    );
  }

  #closeAll(): void {
    if (this.#pagemapFd >= 0) closeFd(this.#pagemapFd, 'tracking');
    this.#pagemapFd = -1;
    this.#protection?.close();
    this.#protection = undefined;
  }
}

/** Each range's pages (its own numbering) in the region's numbering, one ascending list. */
function joinRanges(ranges: readonly { firstPage: number }[], scans: Uint32Array[]): Uint32Array {
  const out = new Uint32Array(scans.reduce((n, s) => n + s.length, 0));
  let at = 0;
  scans.forEach((s, i) => {
    const base = ranges[i]!.firstPage;
    for (let k = 0; k < s.length; k++) out[at++] = s[k]! + base;
  });
  return out;
}
