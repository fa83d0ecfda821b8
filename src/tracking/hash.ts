/**
 * Portable fallback: keeps an XXH64 of every page and reports the pages whose hash changed.
 * Works on any Linux kernel and for memory written by any process, since it reads pages
 * through livemig's own mapping. Cost: a full read of the region per collect (native, two
 * threads). Between rounds a page counts as written when its bytes differ from the last
 * collect's; the final collect compares with what the destination holds (the hash of what was
 * sent, when the caller gives it): a page sent while a write was half done (a kernel's lock
 * taken), then written back (the lock released) hashes as the last collect saw it, and only
 * the sent hash tells it apart. Found migrating a QEMU VM, whose kernel hung at the
 * destination on a stale lock.
 */
import { addon, callAsync } from '../native.js';
import type { Region } from '../region/region.js';
import { TrackerState } from './state.js';
import type { DirtyTracker } from './types.js';

export class HashTracker implements DirtyTracker {
  readonly backend = 'hash' as const;
  readonly pageCount: number;
  readonly #region: Region;
  readonly #state = new TrackerState('hash');
  #hashes: BigUint64Array | undefined;

  constructor(region: Region) {
    this.#region = region;
    this.pageCount = region.pageCount;
  }

  async start(): Promise<void> {
    this.#state.beginStart();
    this.#hashes = new BigUint64Array(this.pageCount);
    await this.#scan();
    this.#state.started();
  }

  collect(): Promise<Uint32Array> {
    return this.#state.collecting(() => this.#scan());
  }

  collectFinal(sent?: BigUint64Array): Promise<Uint32Array> {
    if (!sent || sent.length !== this.pageCount) return this.collect();
    const region = this.#region;
    const against = sent.slice(); // hashCompare stores the current hashes in the table it is given
    return this.#state.collecting(() =>
      callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'hashing pages against what was sent', () =>
        addon.hashCompare(region.nativeHandle, 0, region.pageCount, region.pageSize, against),
      ),
    );
  }

  async stop(): Promise<void> {
    if (!this.#state.beginStop()) return;
    await this.#state.quiesce();
    this.#hashes = undefined;
  }

  #scan(): Promise<Uint32Array> {
    const hashes = this.#hashes!;
    const region = this.#region;
    return callAsync('ERR_LIVEMIG_TRACKING', 'tracking', 'hashing pages', () =>
      addon.hashCompare(region.nativeHandle, 0, region.pageCount, region.pageSize, hashes),
    );
  }
}
