/**
 * The pacer: one owner for everything that decides how fast a migration sends. It holds the
 * user's cap (changeable while running through MigrationControl), the per-round limit of rate
 * adaptation, the token bucket that enforces the lower of the two, the meters of what the link
 * achieved, and the call size that keeps pacing smooth. Pre-copy and post-copy both send
 * through it, so a cap set at any moment applies to whichever is running.
 */
import { RateMeter, TokenBucket } from './bandwidth.js';

const MIB = 2 ** 20;
/** the bucket is consulted about every 20 ms of sending at the paced rate */
const PACE_SLICE_S = 0.02;
/** post-copy pushes this many pages per call when nothing limits the rate */
const UNPACED_PUSH_PAGES = 1024;
/** ... and at least this many when paced */
const MIN_PUSH_PAGES = 16;

export interface PacerOptions {
  pageSize: number;
  /** pages per frame: the smallest paced chunk */
  batchPages: number;
  /** the user's cap, MiB/s */
  capMiBps?: number;
  /** Clark's rate adaptation: the first round's rate, MiB/s */
  startMiBps?: number;
  clock?: () => number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class Pacer {
  readonly #pageSize: number;
  readonly #batchPages: number;
  readonly #clock: () => number;
  #capMiBps: number | undefined;
  #roundLimitMiBps: number | undefined;
  #bucket: TokenBucket | undefined;
  /** what the link achieved on chunks that were mostly page bodies */
  readonly #meter = new RateMeter(1000);
  /** ... and on chunks of zero and skipped pages, which measure the CPU more than the link */
  readonly #lightMeter = new RateMeter(1000);

  constructor(o: PacerOptions) {
    this.#pageSize = o.pageSize;
    this.#batchPages = o.batchPages;
    this.#clock = o.clock ?? (() => performance.now());
    this.#capMiBps = o.capMiBps;
    this.#roundLimitMiBps = o.startMiBps;
    this.#apply();
  }

  /** The user's cap, MiB/s, or undefined for none: applies from the next chunk on. */
  setCap(mibps: number | undefined): void {
    this.#capMiBps = mibps;
    this.#apply();
  }

  /** Rate adaptation's limit for the next round, or undefined (stop-and-copy goes at the cap). */
  setRoundLimit(mibps: number | undefined): void {
    this.#roundLimitMiBps = mibps;
    this.#apply();
  }

  /** The rate enforced now, bytes per second, or undefined when unpaced. */
  get bytesPerSecond(): number | undefined {
    return this.#bucket?.bytesPerSecond;
  }

  /** The rate enforced now in MiB/s, 0 when unpaced (as RoundStats reports it). */
  get limitMiBps(): number {
    return this.#bucket ? +(this.#bucket.bytesPerSecond / MIB).toFixed(1) : 0;
  }

  /**
   * Pages for the next pre-copy call: about 20 ms of sending when paced; otherwise `whole`, or
   * 16 frames when the round may have to stop early (a deadline, the byte bound, a time budget).
   */
  chunkPages(whole: number, o: { mayStopEarly: boolean }): number {
    const rate = this.#bucket?.bytesPerSecond;
    if (rate !== undefined) return Math.max(this.#batchPages, Math.floor((rate * PACE_SLICE_S) / this.#pageSize));
    return o.mayStopEarly ? 16 * this.#batchPages : whole;
  }

  /** Pages for the next post-copy push call: small when paced, so that the pacing is smooth. */
  pushPages(): number {
    const rate = this.#bucket?.bytesPerSecond;
    return rate !== undefined ? Math.max(MIN_PUSH_PAGES, Math.floor((rate * PACE_SLICE_S) / this.#pageSize)) : UNPACED_PUSH_PAGES;
  }

  /**
   * `bytes` of `pages` pages went out between t0 and t1 (ms). Chunks of skipped and zero pages
   * measure the CPU, and would make the estimate for raw dirty pages too low: they are kept apart.
   */
  record(bytes: number, pages: number, t0: number, t1: number): void {
    (bytes >= 0.5 * pages * this.#pageSize ? this.#meter : this.#lightMeter).add(t1, bytes, t1 - t0);
  }

  /** Bandwidth achieved over the last second, MB/s, or undefined before any chunk. */
  achievedMbps(): number | undefined {
    return this.#meter.mbps() ?? this.#lightMeter.mbps();
  }

  /**
   * What the pacer lets through, MB/s, or undefined when nothing caps it. An estimate of how long
   * the rest takes must not assume more: a burst the bucket let through is no measure of the cap.
   */
  limitMbps(): number | undefined {
    const limits = [this.#capMiBps, this.#roundLimitMiBps].filter((x): x is number => x !== undefined);
    return limits.length ? (Math.min(...limits) * MIB) / 1e6 : undefined;
  }

  /** The bandwidth to estimate with: what was achieved, never above the cap. */
  estimateMbps(): number | undefined {
    const achieved = this.achievedMbps();
    const limit = this.limitMbps();
    return achieved === undefined ? limit : Math.min(achieved, limit ?? Number.POSITIVE_INFINITY);
  }

  /** Takes `bytes` from the bucket; returns the ms to wait before the next send (0: at once). */
  take(bytes: number): number {
    return this.#bucket?.take(bytes, this.#clock()) ?? 0;
  }

  /** Takes `bytes` from the bucket; resolves when the next send may go. */
  async pace(bytes: number): Promise<void> {
    const wait = this.take(bytes);
    if (wait > 0) await sleep(wait);
  }

  sleep(ms: number): Promise<void> {
    return sleep(ms);
  }

  #apply(): void {
    const limits = [this.#capMiBps, this.#roundLimitMiBps].filter((x): x is number => x !== undefined);
    if (limits.length === 0) this.#bucket = undefined;
    else if (this.#bucket) this.#bucket.setRate(Math.min(...limits) * MIB, this.#clock());
    else this.#bucket = new TokenBucket(Math.min(...limits) * MIB, this.#clock());
  }
}
