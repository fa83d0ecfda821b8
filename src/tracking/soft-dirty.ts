/**
 * Soft-dirty bits (kernels built with CONFIG_MEM_SOFT_DIRTY): pagemap bit 55, cleared for a
 * whole process by writing 4 to /proc/PID/clear_refs.
 *
 * Caveat, inherent to the interface: reading the bits and clearing them are two steps. A page
 * first written between them is cleared unseen. It is exact only while the writer is paused
 * (the final collect of a migration); uffd-async has no such window and is preferred.
 */
import { addon, call, callAsync, closeFd } from '../native.js';
import type { Region } from '../region/region.js';
import { TrackerState } from './state.js';
import type { DirtyTracker, RemoteTarget } from './types.js';

export class SoftDirtyTracker implements DirtyTracker {
  readonly backend = 'soft-dirty' as const;
  readonly pageCount: number;
  readonly #region: Region;
  readonly #target: RemoteTarget | undefined;
  readonly #state = new TrackerState('soft-dirty');
  #pagemapFd = -1;

  constructor(region: Region, target?: RemoteTarget) {
    this.#region = region;
    this.#target = target;
    this.pageCount = region.pageCount;
  }

  get #pid(): number {
    return this.#target?.pid ?? 0;
  }
  get #address(): bigint {
    return this.#target?.address ?? this.#region.address;
  }

  async start(): Promise<void> {
    this.#state.beginStart();
    this.#pagemapFd = call('ERR_LIVEMIG_TRACKING', 'tracking', 'opening pagemap', () => addon.pagemapOpen(this.#pid));
    this.#clear();
    this.#state.started();
  }

  collect(): Promise<Uint32Array> {
    return this.#state.collecting(async () => {
      const pages = await callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'reading soft-dirty bits', () =>
        addon.softDirtyScan(this.#pagemapFd, this.#address, this.#region.size, this.#region.pageSize, false),
      );
      this.#clear();
      return pages;
    });
  }

  /** Reading the bits without clearing them: the pages the next collect() would report so far. */
  peekWritten(): Promise<number | undefined> {
    return this.#state.peeking(async () => {
      const pages = await callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'reading soft-dirty bits', () =>
        addon.softDirtyScan(this.#pagemapFd, this.#address, this.#region.size, this.#region.pageSize, false),
      );
      return pages.length;
    });
  }

  collectFinal(): Promise<Uint32Array> {
    return this.collect();
  }

  async stop(): Promise<void> {
    if (!this.#state.beginStop()) return;
    await this.#state.quiesce();
    closeFd(this.#pagemapFd, 'tracking');
    this.#pagemapFd = -1;
  }

  #clear(): void {
    call('ERR_LIVEMIG_TRACKING', 'tracking', 'clearing soft-dirty bits', () => addon.softDirtyClear(this.#pid));
  }
}
