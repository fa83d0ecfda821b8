/**
 * Bandwidth: what the link achieved (a sliding window over what was sent, after encoding) and a
 * cap enforced smoothly (a token bucket, not bursts). Both take the clock as an argument so
 * they can be tested without waiting.
 */

/** Bytes sent over the last `windowMs`, as a rate. */
export class RateMeter {
  readonly #windowMs: number;
  readonly #samples: { t: number; bytes: number; ms: number }[] = [];

  constructor(windowMs = 1000) {
    this.#windowMs = windowMs;
  }

  /** `bytes` went out in `ms` of sending, ending at time `t` (ms). */
  add(t: number, bytes: number, ms: number): void {
    this.#samples.push({ t, bytes, ms });
    while (this.#samples.length > 1 && this.#samples[0]!.t < t - this.#windowMs) this.#samples.shift();
  }

  /**
   * MB/s (10^6 bytes) over the window in wall-clock time, from the start of its first sample to
   * the end of its last: pauses imposed by a bandwidth cap count, so this is the rate achieved.
   * Undefined before any sample.
   */
  mbps(): number | undefined {
    const first = this.#samples[0];
    const last = this.#samples.at(-1);
    if (!first || !last) return undefined;
    let bytes = 0;
    for (const s of this.#samples) bytes += s.bytes;
    const span = last.t - (first.t - first.ms);
    return span > 0 ? bytes / 1e3 / span : undefined;
  }
}

/**
 * A token bucket: `rate` bytes per second, holding at most `burstMs` worth. take(n) says how
 * long to wait before sending n bytes; tokens may go negative by one request, so a request
 * larger than the burst is allowed and paid for afterwards (the average still holds).
 */
export class TokenBucket {
  #rate: number; // bytes per ms
  #tokens: number;
  #last: number;
  readonly #burstMs: number;

  constructor(bytesPerSecond: number, now: number, burstMs = 20) {
    this.#rate = bytesPerSecond / 1000;
    this.#burstMs = burstMs;
    this.#tokens = this.#rate * burstMs;
    this.#last = now;
  }

  get bytesPerSecond(): number {
    return this.#rate * 1000;
  }

  /** Changes the rate from now on; tokens gathered so far are kept (up to the new burst). */
  setRate(bytesPerSecond: number, now: number): void {
    this.#refill(now);
    this.#rate = bytesPerSecond / 1000;
    this.#tokens = Math.min(this.#tokens, this.#rate * this.#burstMs);
  }

  /** Takes `bytes` at time `now`; returns the ms to wait before sending them (0: at once). */
  take(bytes: number, now: number): number {
    this.#refill(now);
    const wait = this.#tokens >= 0 ? 0 : -this.#tokens / this.#rate;
    this.#tokens -= bytes;
    return wait;
  }

  #refill(now: number): void {
    this.#tokens = Math.min(this.#tokens + (now - this.#last) * this.#rate, this.#rate * this.#burstMs);
    this.#last = now;
  }
}
