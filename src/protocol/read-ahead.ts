/**
 * Frames a connection read before anyone asked for them (FramedConnection.readAhead, for a
 * sender that must notice an ERROR from the destination while it is busy sending): handed to a
 * reader already waiting, or queued for the next one, within a bound.
 */
import type { Frame } from './frame.js';
import { FrameType } from './format.js';
import type { WireFrame } from './wire.js';

/** read-ahead holds at most this much that nobody asked for (a source needs a few ROUND_ACKs) */
const READ_AHEAD_MAX_FRAMES = 1024;
const READ_AHEAD_MAX_BYTES = 8 << 20;

interface Waiter {
  resolve: (f: WireFrame) => void;
  reject: (e: Error) => void;
}

export class ReadAheadQueue {
  #queue: WireFrame[] = [];
  #queuedBytes = 0;
  #waiters: Waiter[] = [];
  /** told when a frame is queued (nobody was waiting for it) */
  #arrivals: (() => void)[] = [];

  /**
   * A frame that arrived: to the reader waiting longest, or queued. Returns why the queue is
   * over its bound, if it is (a peer must not make us hold without bound what nobody asked for).
   */
  push(f: WireFrame): string | undefined {
    const w = this.#waiters.shift();
    if (w) {
      w.resolve(f);
      return undefined;
    }
    this.#queue.push(f);
    this.#queuedBytes += f.payload.length;
    for (const tell of this.#arrivals.splice(0)) tell();
    if (this.#queue.length > READ_AHEAD_MAX_FRAMES || this.#queuedBytes > READ_AHEAD_MAX_BYTES) {
      return `the peer sent ${this.#queue.length} frames (${this.#queuedBytes} bytes) that nobody has read: more than a migration ever needs queued`;
    }
    return undefined;
  }

  /**
   * The next frame: the oldest queued, or the next to arrive. `ended`: why no more can arrive
   * (then only what is queued is left). After `timeoutMs` with nothing, the wait fails with
   * what `onTimeout` returns (it ends the connection).
   */
  next(o: { timeoutMs?: number | undefined; ended: Error | undefined; onTimeout: () => Error }): Promise<WireFrame> {
    const f = this.#queue.shift();
    if (f) {
      this.#queuedBytes -= f.payload.length;
      return Promise.resolve(f);
    }
    if (o.ended) return Promise.reject(o.ended);
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      this.#waiters.push(w);
      if (o.timeoutMs !== undefined) {
        setTimeout(() => {
          const i = this.#waiters.indexOf(w);
          if (i < 0) return;
          this.#waiters.splice(i, 1);
          reject(o.onTimeout());
        }, o.timeoutMs).unref();
      }
    });
  }

  /** The oldest queued frame of `type`, taken out of the queue; undefined when none has arrived. */
  take(type: FrameType): WireFrame | undefined {
    const i = this.#queue.findIndex((f) => f.type === type);
    if (i < 0) return undefined;
    const [f] = this.#queue.splice(i, 1);
    this.#queuedBytes -= f!.payload.length;
    return f;
  }

  /** Resolves when the next frame is queued, or after `timeoutMs`: a wait that takes nothing. */
  arrival(timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        const i = this.#arrivals.indexOf(done);
        if (i >= 0) this.#arrivals.splice(i, 1);
        resolve();
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        resolve();
      };
      this.#arrivals.push(done);
    });
  }

  /** An ERROR frame the peer sent that nobody has read yet, taken out of the queue. */
  takeError(): Frame | undefined {
    const i = this.#queue.findIndex((f) => f.type === FrameType.Error);
    if (i < 0) return undefined;
    const [f] = this.#queue.splice(i, 1);
    this.#queuedBytes -= f!.payload.length;
    return f;
  }

  /** Every reader still waiting fails with `e`: nothing more will arrive. */
  fail(e: Error): void {
    for (const w of this.#waiters.splice(0)) w.reject(e);
  }
}
