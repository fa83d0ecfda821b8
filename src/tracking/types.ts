/** 'shared': a same-host upgrade, where the destination maps the very memory: nothing to track */
export type BackendName = 'uffd-async' | 'soft-dirty' | 'hash' | 'external' | 'shared';

/**
 * Tracks which pages of a region were written.
 * collect() returns the pages written since the previous collect() (or since start()),
 * as ascending page indices, and re-arms them: a write that lands after a page was
 * collected is reported by the next collect().
 */
export interface DirtyTracker {
  readonly backend: BackendName;
  readonly pageCount: number;
  start(): Promise<void>;
  collect(): Promise<Uint32Array>;
  /**
   * The last collect, with the guest paused until it runs elsewhere or resumes after a failure
   * (when tracking stops): the same pages as collect(), but nothing needs protecting again, so
   * a backend may skip re-arming, and should answer as fast as it can (it is inside the pause):
   * one that can answer on the calling thread returns the pages themselves, which spares the
   * pause a trip through the microtask queue. No collect may follow it; stop() may.
   * `sent`: each page's hash as the destination holds it (what was last sent); a tracker that
   * compares content compares against it (a page sent while being written, then written back
   * to what the last collect saw, is otherwise missed).
   */
  collectFinal(sent?: BigUint64Array): Uint32Array | Promise<Uint32Array>;
  stop(): Promise<void>;
  /**
   * How many pages were written since the last collect() (or start()), without re-arming
   * anything: what the next collect() would report so far. Backends that can tell cheaply (a
   * page-table walk) have it; it lets progress show the guest's dirtying rate during a round.
   * Undefined once tracking stopped.
   */
  peekWritten?(): Promise<number | undefined>;
}

/** Where the memory being tracked is written: this process, or another one (a guest). */
export interface RemoteTarget {
  /** pid of the process that writes the region through its own mapping */
  pid: number;
  /** start address of that process's mapping of the region */
  address: bigint;
  /**
   * a region of several pieces (a guest's regions): where each is mapped in that process and
   * which pages of the region it holds, in order; `address` is then the first one's
   */
  ranges?: { address: bigint; firstPage: number; pages: number }[];
}
