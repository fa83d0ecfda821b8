import { LivemigError } from '../errors.js';

/** The small lifecycle every tracker shares: idle -> tracking -> stopped, one collect at a time. */
export class TrackerState {
  #state: 'idle' | 'tracking' | 'stopped' = 'idle';
  #inFlight: Promise<unknown> | undefined;
  readonly #peeks = new Set<Promise<unknown>>();
  constructor(private readonly backend: string) {}

  get tracking(): boolean {
    return this.#state === 'tracking';
  }

  beginStart(): void {
    if (this.#state !== 'idle') throw this.#error(`start() called while ${this.#state}`);
  }
  started(): void {
    this.#state = 'tracking';
  }
  /** Returns false when already stopped (stop is idempotent). */
  beginStop(): boolean {
    if (this.#state === 'stopped') return false;
    this.#state = 'stopped';
    return true;
  }

  async collecting<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#state !== 'tracking') throw this.#error(`collect() called while ${this.#state}`);
    if (this.#inFlight) throw this.#error('collect() called while another collect() is running');
    const p = fn();
    this.#inFlight = p;
    try {
      return await p;
    } finally {
      this.#inFlight = undefined;
    }
  }

  /**
   * A read that re-arms nothing (peekWritten): it may run beside a collect; stop() waits for it
   * before closing what it reads. Undefined when not tracking.
   */
  async peeking<T>(fn: () => Promise<T>): Promise<T | undefined> {
    if (this.#state !== 'tracking') return undefined;
    const p = fn();
    this.#peeks.add(p);
    try {
      return await p;
    } finally {
      this.#peeks.delete(p);
    }
  }

  /** Waits for a collect() and any peek in flight (their outcomes belong to their own callers). */
  async quiesce(): Promise<void> {
    // the callers receive these errors; stop() only waits for them
    await Promise.allSettled([this.#inFlight, ...this.#peeks]);
  }

  #error(message: string): LivemigError {
    const code = this.#state === 'stopped' ? 'ERR_LIVEMIG_RELEASED' : 'ERR_LIVEMIG_STATE';
    return new LivemigError(code, `${this.backend} tracker: ${message}`, { phase: 'tracking' });
  }
}
