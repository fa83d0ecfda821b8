/**
 * The writing side of a FramedConnection (connection.ts): writes are serialised (frames never
 * interleave), and a small frame, or a few pages, with nothing queued ahead go from the calling
 * thread. The first failure ends writing: every later write fails with it.
 */
import type { LivemigError } from '../errors.js';
import { fromNative, type NativeSendEncoded, type NativeWire, type SendCounts } from '../native.js';
import { connectionClosed } from './errors.js';
import { nativeSendPages, remainder, SEND_NOW_MAX, SEND_NOW_PAGES, type SendPagesRequest } from './wire.js';

export class FrameWriter {
  readonly #wire: NativeWire;
  readonly #closed: () => boolean;
  #writes: Promise<unknown> = Promise.resolve();
  /** writes queued or running: a frame goes at once only when nothing is ahead of it */
  #writesPending = 0;
  #failure: LivemigError | undefined;

  /** `closed`: whether the connection was closed (nothing may be written then). */
  constructor(wire: NativeWire, closed: () => boolean) {
    this.#wire = wire;
    this.#closed = closed;
  }

  /** Why writing ended, if it did. */
  get failure(): LivemigError | undefined {
    return this.#failure;
  }

  /** Ends writing with `e`, unless it had already ended (the first failure explains best). */
  fail(e: LivemigError): void {
    this.#failure ??= e;
  }

  /** See FramedConnection.send. */
  send(frame: Buffer | Buffer[]): Promise<void> {
    let parts = Array.isArray(frame) ? frame : [frame];
    // A small frame with nothing ahead of it goes from this thread: a control message inside
    // the pause would otherwise wait for a pool thread to wake and for this loop to hear back.
    if (this.#idle()) {
      const total = parts.reduce((n, p) => n + p.length, 0);
      if (total <= SEND_NOW_MAX) {
        let sent: number;
        try {
          sent = this.#wire.writeNow(parts);
        } catch (e) {
          this.#failure ??= fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', 'sending a frame');
          return Promise.reject(this.#failure);
        }
        if (sent === total) return Promise.resolve();
        // encrypted: the frame was sealed whole and part of its record waits in the Wire
        parts = sent < 0 ? [] : remainder(parts, sent);
      }
    }
    return this.#write('sending a frame', () => this.#wire.write(parts));
  }

  /**
   * Queues `frame` as the last one, and ends writing with `e` for everything else: a write
   * running now finishes (a frame is never cut), those queued behind it are dropped (each fails
   * with `e`), and `frame` goes next. Rejects when writing had ended already, or fails.
   */
  sendLast(frame: Buffer, e: LivemigError): Promise<void> {
    if (this.#failure || this.#closed()) return Promise.reject(this.#failure ?? connectionClosed());
    const last = this.#write('sending its last frame', () => this.#wire.write([frame]), e);
    this.#failure = e;
    return last;
  }

  /** See FramedConnection.sendPages. */
  sendPages(req: SendPagesRequest): Promise<SendCounts> {
    const now = req.now === true && req.pages.length <= SEND_NOW_PAGES && this.#idle();
    const call = nativeSendPages(req, now);
    if (now) {
      return this.#wire.sendPages(call).catch((e: unknown) => {
        this.#failure ??= fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', 'sending pages');
        throw this.#failure;
      });
    }
    return this.#write('sending pages', () => this.#wire.sendPages(call));
  }

  /** See FramedConnection.sendEncoded. */
  sendEncoded(batch: NativeSendEncoded): Promise<number> {
    return this.#write('sending pages', () => this.#wire.sendEncoded(batch));
  }

  /** Nothing queued or running, and writing has not ended: a write may go from this thread. */
  #idle(): boolean {
    return this.#writesPending === 0 && !this.#failure && !this.#closed();
  }

  /** `endedBy`: the write sendLast queued, which goes although writing was ended (with that reason) after it was queued */
  async #write(what: string, op: () => Promise<unknown>, endedBy?: LivemigError): Promise<never> {
    this.#writesPending++;
    const run = this.#writes.then(async () => {
      try {
        if (this.#failure && this.#failure !== endedBy) throw this.#failure;
        if (this.#closed()) throw connectionClosed();
        try {
          return await op();
        } catch (e) {
          this.#failure ??= fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', what);
          throw this.#failure;
        }
      } finally {
        // before the caller hears of it: its next frame may then go at once (see send)
        this.#writesPending--;
      }
    });
    this.#writes = run.catch(() => undefined);
    return run as Promise<never>;
  }
}
