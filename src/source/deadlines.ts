/**
 * The source's deadlines after the handshake (whose own timeout is the handshake's): no
 * acknowledged progress for `progressTimeoutMs`, and no commitment within `maxPauseMs` of
 * pausing the guest. Either ends the migration through `abort`, which makes every pending and
 * later operation on the connection fail; the rollback then resumes the guest here. Both stop
 * at the point of commitment: from there the guest may run at the destination, and only the
 * destination can say whether it does.
 */
import { LivemigError } from '../errors.js';

export class Deadlines {
  readonly #progressTimeoutMs: number;
  readonly #maxPauseMs: number;
  readonly #abort: (e: LivemigError) => void;
  readonly #stage: () => string;
  #lastProgress = performance.now();
  #watch: NodeJS.Timeout | undefined;
  #pause: NodeJS.Timeout | undefined;

  constructor(o: { progressTimeoutMs: number; maxPauseMs: number; abort: (e: LivemigError) => void; stage: () => string }) {
    this.#progressTimeoutMs = o.progressTimeoutMs;
    this.#maxPauseMs = o.maxPauseMs;
    this.#abort = o.abort;
    this.#stage = o.stage;
  }

  /** From now on, progress must be seen at least every progressTimeoutMs. */
  watchProgress(): void {
    this.noteProgress();
    if (this.#watch) return;
    const every = Math.max(10, Math.min(1000, this.#progressTimeoutMs / 4));
    this.#watch = setInterval(() => {
      const idle = performance.now() - this.#lastProgress;
      if (idle < this.#progressTimeoutMs) return;
      this.stop();
      this.#abort(
        new LivemigError(
          'ERR_LIVEMIG_TIMEOUT',
          `no progress from the destination for ${Math.round(idle)} ms (progress timeout ${this.#progressTimeoutMs} ms): aborted; the guest keeps running on the source`,
          { phase: this.#stage() },
        ),
      );
    }, every);
    this.#watch.unref();
  }

  /** Pages were taken by the connection, or the destination acknowledged a round. */
  noteProgress(): void {
    this.#lastProgress = performance.now();
  }

  /** The guest is being paused: commitment must come within maxPauseMs. */
  armPause(): void {
    if (this.#pause) return;
    this.#pause = setTimeout(() => {
      this.stop();
      this.#abort(
        new LivemigError(
          'ERR_LIVEMIG_TIMEOUT',
          `no commitment within ${this.#maxPauseMs} ms of pausing the guest (max pause): aborted; the guest resumes on the source`,
          { phase: this.#stage() },
        ),
      );
    }, this.#maxPauseMs);
    this.#pause.unref();
  }

  stop(): void {
    if (this.#watch) clearInterval(this.#watch);
    if (this.#pause) clearTimeout(this.#pause);
    this.#watch = this.#pause = undefined;
  }
}
