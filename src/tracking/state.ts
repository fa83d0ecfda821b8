import { LivemigError } from '../errors.js';

/** The small lifecycle every tracker shares: idle -> tracking -> stopped, one collect at a time. */
export class TrackerState {
  #state: 'idle' | 'tracking' | 'stopped' = 'idle';
  #inFlight: Promise<unknown> | undefined;
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

  /** Waits for a collect() in flight (its outcome belongs to its own caller). */
  async quiesce(): Promise<void> {
    const p = this.#inFlight;
    if (p)
      await p.then(
        () => undefined,
        () => undefined, // the collect's caller receives this error; stop() only waits for it
      );
  }

  #error(message: string): LivemigError {
    const code = this.#state === 'stopped' ? 'ERR_LIVEMIG_RELEASED' : 'ERR_LIVEMIG_STATE';
    return new LivemigError(code, `${this.backend} tracker: ${message}`, { phase: 'tracking' });
  }
}
