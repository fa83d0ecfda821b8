/**
 * A FramedConnection: one connection once it carries frames (the migration's main connection,
 * each parallel channel's, post-copy's push and priority ones). A native Wire
 * (native/wire/wire.cc) owns the socket's descriptor, so page batches move between the region
 * and the kernel with no JavaScript per page and no user-space copy. This class serialises
 * writes (frames never interleave: writer.ts), allows one read at a time, and turns native
 * failures into LivemigErrors.
 *
 * Reads are on demand (`next`), or continuous (`readAhead`, for a sender that must notice an
 * ERROR from the destination while it is busy sending: read-ahead.ts). With a page sink, a read
 * applies PAGES frames to the region natively and returns the first frame of any other type.
 * How a socket is taken over from Node is take-over.ts; the native calls' shapes, wire.ts.
 */
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { fromNative, type NativeFrame, type NativeSendEncoded, type NativeWire, type SendCounts, type WireKeys } from '../native.js';
import { connectionClosed, ProtocolError } from './errors.js';
import type { Frame } from './frame.js';
import { FrameType } from './format.js';
import { frameLimits } from './limits.js';
import { ReadAheadQueue } from './read-ahead.js';
import { takeOverAfterFirstFrame, takeOverSecured, takeOverSocket } from './take-over.js';
import { nativeRead, type PageSink, type SendPagesRequest, type WireFrame } from './wire.js';
import { FrameWriter } from './writer.js';

export class FramedConnection {
  readonly #wire: NativeWire;
  readonly #writer: FrameWriter;
  #reading = false;
  // The stream can break one way only: a protocol error ends reading (the position in the
  // stream is lost) but an ERROR frame can still be written; a failed write ends writing (the
  // writer's failure).
  #readFailure: LivemigError | undefined;
  #closed = false;
  /** abortTelling's last frame on its way, and until when the peer has to read it (Date.now ms) */
  #telling: { sent: Promise<void>; until: number } | undefined;
  /** in read-ahead mode, the frames read before anyone asked */
  #ahead: ReadAheadQueue | undefined;
  /** each frame type's payload limit (protocol/limits.ts); set again once the region is known */
  #limits = frameLimits();

  private constructor(wire: NativeWire) {
    this.#wire = wire;
    this.#writer = new FrameWriter(wire, () => this.#closed);
  }

  /** Takes over a connected socket that nothing has read from (take-over.ts, takeOverSocket). */
  static fromSocket(socket: net.Socket): FramedConnection {
    return new FramedConnection(takeOverSocket(socket));
  }

  /**
   * Takes over a connection from which exactly `consumed` bytes were read, its first frame
   * (take-over.ts, takeOverAfterFirstFrame).
   */
  static fromSocketAfter(socket: net.Socket, consumed: number, keys?: WireKeys): FramedConnection {
    return new FramedConnection(takeOverAfterFirstFrame(socket, consumed, keys));
  }

  /** Takes over a connection on which a TLS handshake ran (take-over.ts, takeOverSecured). */
  static fromSecured(raw: net.Socket, tls: net.Socket, keys: WireKeys): FramedConnection {
    return new FramedConnection(takeOverSecured(raw, tls, keys));
  }

  /**
   * The native connection, for a post-copy service to take over (its descriptor, and its
   * records' keys and counters when encrypted); no read or write may be left running on this
   * connection from then on.
   */
  get handle(): NativeWire {
    return this.#wire;
  }

  /**
   * Lets go of the connection without shutting it down, after a post-copy service took it
   * over; the connection is closed for this side from then on.
   */
  handOff(): void {
    this.#closed = true;
    this.#wire.forget();
  }

  /** True once nothing more can be sent: the connection failed or was closed. */
  get closed(): boolean {
    return this.#closed || this.#writer.failure !== undefined;
  }

  /** Each frame type's payload limit from now on (frameLimits(), once the region is known). */
  setFrameLimits(limits: Uint32Array): void {
    this.#limits = limits;
  }

  /**
   * Fails a receive that sees no byte for `ms`, and a send that can move no byte for `ms` (a
   * peer that stopped reading); 0: wait forever.
   */
  setIdleTimeout(ms: number): void {
    this.#wire.setTimeouts(ms, ms);
  }

  /**
   * The answer to a connection's first frame (ACCEPT, ATTACHED, RESOLVED): its sender waits for
   * it, so nothing may have come after that frame; anything that did is refused here, on every
   * path (plain or encrypted), instead of being read as the next frame.
   */
  answerFirst(frame: Buffer): Promise<void> {
    let unread: number;
    try {
      unread = this.#wire.unread();
    } catch (e) {
      return Promise.reject(fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'handshake', 'checking what followed the first frame'));
    }
    if (unread > 0) return Promise.reject(new ProtocolError('ERR_LIVEMIG_PROTOCOL', `${unread} bytes came after the first frame, before it was answered`));
    return this.send(frame);
  }

  /**
   * Queues whole frames (a buffer each, or parts of one); resolves once the kernel has them. A
   * small frame with nothing queued ahead goes from the calling thread (writer.ts).
   */
  send(frame: Buffer | Buffer[]): Promise<void> {
    return this.#writer.send(frame);
  }

  /**
   * Sends pages straight from the region: PAGES frames, or with `flags` (SEND_ZERO, SEND_DEDUP;
   * needs `dedup`) PAGES_ENC frames with zero/dup/raw pages chosen in place; raw pages that may
   * serve as dup sources enter the dedup index as they went (see native/wire/send_pages.cc).
   * With `now`, up to SEND_NOW_PAGES pages with nothing queued ahead go from the calling thread
   * (the last pages, inside the pause).
   */
  sendPages(req: SendPagesRequest): Promise<SendCounts> {
    return this.#writer.sendPages(req);
  }

  /** Sends one classified batch as a PAGES_ENC frame (see src/encoding/encoder.ts). */
  sendEncoded(batch: NativeSendEncoded): Promise<number> {
    return this.#writer.sendEncoded(batch);
  }

  /**
   * The next frame. With a sink, PAGES frames before it are applied to the sink's region.
   * `timeoutMs` bounds the wait for the frame as a whole; the connection is unusable after.
   */
  async next(timeoutMs?: number, sink?: PageSink): Promise<WireFrame> {
    if (this.#ahead) {
      if (sink) throw new LivemigError('ERR_LIVEMIG_STATE', 'a read-ahead connection cannot take a page sink', { phase: 'transport' });
      const ended = this.#readFailure ?? (this.#closed ? connectionClosed() : undefined);
      return this.#ahead.next({ timeoutMs, ended, onTimeout: () => this.#timedOut(timeoutMs!) });
    }
    if (this.#reading) throw new LivemigError('ERR_LIVEMIG_STATE', 'a read is already in progress on this connection', { phase: 'transport' });
    // A control frame that has already arrived is taken on this thread (no read is running)
    if (!this.#readFailure && !this.#closed) {
      let ready: NativeFrame | null;
      try {
        ready = this.#wire.readNow(nativeRead(this.#limits));
      } catch {
        ready = null; // a broken connection: the read below reports it
      }
      if (ready) return { ...ready, type: ready.type as FrameType };
    }
    this.#reading = true;
    let timer: NodeJS.Timeout | undefined;
    try {
      const read = this.#readOne(sink);
      if (timeoutMs === undefined) return await read;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(this.#timedOut(timeoutMs)), timeoutMs);
      });
      return await Promise.race([read, timeout]);
    } finally {
      if (timer) clearTimeout(timer);
      this.#reading = false;
    }
  }

  /** Waits for a frame of `type`; an ERROR frame from the peer becomes `onError`'s error. */
  async expect(type: FrameType, onError: (f: Frame) => Error, timeoutMs?: number): Promise<WireFrame> {
    const f = await this.next(timeoutMs);
    if (f.type === type) return f;
    if (f.type === FrameType.Error) throw onError(f);
    throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `expected ${FrameType[type]}, got ${FrameType[f.type]}`);
  }

  /** From now on, frames are read as they arrive and queued for next(). */
  readAhead(): void {
    if (this.#ahead) return;
    if (this.#reading) throw new LivemigError('ERR_LIVEMIG_STATE', 'a read is already in progress on this connection', { phase: 'transport' });
    const ahead = new ReadAheadQueue();
    this.#ahead = ahead;
    const loop = async (): Promise<void> => {
      while (!this.#closed && !this.#readFailure) {
        let f: WireFrame;
        try {
          f = await this.#readOne();
        } catch {
          break; // recorded as the connection's failure by #readOne
        }
        const over = ahead.push(f);
        if (over) {
          this.abort(new ProtocolError('ERR_LIVEMIG_PROTOCOL', over));
          break;
        }
      }
      ahead.fail(this.#readFailure ?? connectionClosed());
    };
    void loop();
  }

  /** A frame of `type` that has arrived and nobody has read yet (read-ahead mode), taken; else undefined. */
  takeQueued(type: FrameType): WireFrame | undefined {
    return this.#ahead?.take(type);
  }

  /** Resolves when a frame arrives (read-ahead mode) or after `timeoutMs`; reads nothing. */
  frameArrival(timeoutMs: number): Promise<void> {
    return this.#ahead ? this.#ahead.arrival(timeoutMs) : new Promise((r) => setTimeout(r, timeoutMs));
  }

  /** An ERROR frame the peer sent that nobody has read yet (read-ahead mode). */
  takeQueuedError(): Frame | undefined {
    return this.#ahead?.takeError();
  }

  /** Whether the peer has already closed (or reset) its end: what we send now it will not hear. */
  peerGone(): boolean {
    if (this.closed) return true;
    return this.#wire.peerGone();
  }

  /**
   * Sends our last frame(s), then closes without resetting what the peer has yet to read.
   * True when the peer's orderly close came within timeoutMs: it read all we sent before it.
   */
  async finish(last?: Buffer, timeoutMs = 200): Promise<boolean> {
    if (this.#closed) return false;
    let peerClosed = false;
    try {
      if (this.#telling) {
        // abortTelling's frame goes first, and the peer gets the time it was given to read up to it
        await this.#telling.sent;
        timeoutMs = Math.max(timeoutMs, this.#telling.until - Date.now());
      }
      if (last && !this.#writer.failure) await Promise.race([this.send(last), new Promise((r) => setTimeout(r, timeoutMs))]);
      peerClosed = await this.#wire.finish(timeoutMs);
    } catch {
      // the connection is already gone: nothing left to deliver
    }
    this.close();
    return peerClosed;
  }

  /**
   * Ends the connection from this side with `e` as the cause (a cancel, a deadline): every
   * pending and later operation fails with it, and a blocked native read or write wakes up.
   */
  abort(e: LivemigError): void {
    this.#failBoth(e);
    if (!this.#closed) this.#wire.shutdown();
    this.#ahead?.fail(e);
  }

  /**
   * abort(e), but the peer hears `last` first (an ABORT that says why): whatever runs or waits
   * here fails with `e` as abort() makes it, except a write already running, which finishes,
   * and `last`, which follows it. The connection is shut down once the peer closed its end
   * (it read `last`), or after `graceMs` (a peer that reads nothing more); finish() waits for
   * `last` to have gone. Without a connection left to write on, this is abort(e).
   */
  abortTelling(e: LivemigError, last: Buffer, graceMs: number): void {
    if (this.#closed || this.#writer.failure) {
      this.abort(e);
      return;
    }
    this.#readFailure ??= e;
    this.#ahead?.fail(e); // whoever waits for a frame hears it now; the loop reading ahead ends with the connection
    const sent = this.#writer.sendLast(last, e);
    const until = Date.now() + graceMs;
    this.#telling = { sent: sent.catch(() => undefined), until };
    const shutDown = (): void => {
      if (!this.#closed) this.#wire.shutdown();
    };
    const timer = setTimeout(shutDown, graceMs);
    timer.unref();
    sent.then(
      () => undefined,
      () => (clearTimeout(timer), shutDown()), // it could not go: nothing is worth waiting for
    );
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#wire.close();
  }

  async #readOne(sink?: PageSink): Promise<WireFrame> {
    if (this.#readFailure) throw this.#readFailure;
    if (this.#closed) throw connectionClosed();
    try {
      const f = await this.#wire.read(nativeRead(this.#limits, sink));
      return { ...f, type: f.type as FrameType };
    } catch (e) {
      const err = fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', 'receiving');
      if (err.phase === 'protocol') this.#readFailure ??= err;
      else this.#failBoth(err); // the connection itself is gone (or timed out)
      throw this.#readFailure;
    }
  }

  /** A read waited `ms` for the peer: the connection ends (a blocked read wakes up); the error. */
  #timedOut(ms: number): LivemigError {
    const e = new LivemigError('ERR_LIVEMIG_TIMEOUT', `no message from the peer within ${ms} ms`, { phase: 'transport' });
    this.#failBoth(e);
    this.#wire.shutdown();
    return e;
  }

  #failBoth(e: LivemigError): void {
    // The first failure is the one that explains what happened; the errors of calls that a
    // shutdown woke up afterwards say less.
    this.#readFailure ??= e;
    this.#writer.fail(e);
  }
}
