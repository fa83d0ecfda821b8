/**
 * A FramedConnection: one connection once it carries frames (the migration's main connection,
 * each parallel channel's, post-copy's push and priority ones). A native Wire
 * (native/wire/wire.cc) owns the socket's descriptor, so page batches move between the region
 * and the kernel with no JavaScript per page and no user-space copy. This class serialises
 * writes (frames never interleave), allows one read at a time, and turns native failures into
 * LivemigErrors.
 *
 * Reads are on demand (`next`), or continuous (`readAhead`, for a sender that must notice an
 * ERROR from the destination while it is busy sending). With a page sink, a read applies
 * PAGES frames to the region natively and returns the first frame of any other type.
 */
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, fromNative, type NativeFrame, type NativeSendEncoded, type NativeSendPages, type NativeWire, type SendCounts, type WireKeys } from '../native.js';
import type { Region } from '../region/region.js';
import type { WrittenProbe } from '../tracking/types.js';
import { ProtocolError } from './errors.js';
import type { Frame } from './frame.js';
import { FrameType, MAX_BATCH_PAGES, MAX_FRAME_TYPE as MAX_TYPE, MAX_PAYLOAD } from './format.js';
import { frameLimits } from './limits.js';

export type { SendCounts } from '../native.js';

/** sendPages flags: PAGES_ENC frames with, in place, zero detection and/or dedup. */
export const SEND_ZERO = 1;
export const SEND_DEDUP = 2;

/**
 * One sendPages call: the region, the pages (ascending within a round) and the round, the
 * negotiated version, pages per frame, and the table each page's hash is stored in as it goes
 * (the commitment digest is over it). PAGES_ENC needs `dedup` (the index of what the receiver
 * holds) and `flags`; with `probe`, raw pages the tracker shows unwritten since their hash
 * enter the dedup index; with `now`, up to SEND_NOW_PAGES pages with nothing queued ahead go
 * from the calling thread.
 */
export type SendPagesRequest = Omit<NativeSendPages, 'region' | 'flags' | 'now' | 'probe'> & { region: Region; flags?: number; probe?: WrittenProbe; now?: boolean };

/** A frame, with what a sink applied before it arrived. */
export interface WireFrame extends Frame {
  /** pages and PAGES frames applied to the sink's region, and their bytes */
  pages: number;
  batches: number;
  bytes: number;
  /** round of the last PAGES frame applied, or -1 */
  lastRound: number;
}

export interface PageSink {
  region: Region;
  /** per-page hashes of what was received, for the commitment digest */
  hashes: BigUint64Array;
  /** the negotiated version; a PAGES frame of another version is refused */
  version: number;
  /**
   * encodings were negotiated: PAGES_ENC frames are decoded, and a dup is checked against
   * `hashes` (what this side holds in each page, from its initial image on)
   */
  encodings?: boolean;
  /** parallel channels: this connection takes only the pages of `stripe.channel`'s stripes */
  stripe?: { channels: number; channel: number };
}

export class FramedConnection {
  readonly #wire: NativeWire;
  #writes: Promise<unknown> = Promise.resolve();
  /** writes queued or running: a frame goes at once only when nothing is ahead of it */
  #writesPending = 0;
  #reading = false;
  // The stream can break one way only: a protocol error ends reading (the position in the
  // stream is lost) but an ERROR frame can still be written; a failed write ends writing.
  #readFailure: LivemigError | undefined;
  #writeFailure: LivemigError | undefined;
  #closed = false;
  // read-ahead mode
  #queue: WireFrame[] = [];
  #queuedBytes = 0;
  #waiters: { resolve: (f: WireFrame) => void; reject: (e: Error) => void }[] = [];
  #readAhead = false;
  /** each frame type's payload limit (protocol/limits.ts); set again once the region is known */
  #limits = frameLimits();

  private constructor(wire: NativeWire) {
    this.#wire = wire;
  }

  /**
   * Takes over a connected socket that nothing has read from: its descriptor is duplicated
   * into a native Wire and the net.Socket is destroyed. Accepting servers should use
   * `pauseOnConnect` so that Node never reads from the connection first.
   */
  static fromSocket(socket: net.Socket): FramedConnection {
    if (socket.bytesRead > 0 || socket.readableLength > 0) {
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'the connection was already read from: hand it over before any data is read (servers: pauseOnConnect)', { phase: 'connect' });
    }
    return FramedConnection.#takeOver(socket, [socket], 'the connection has no file descriptor: a migration needs a connected TCP or Unix socket', 'taking over the connection');
  }

  /**
   * Takes over a connection from which exactly `consumed` bytes were read (its first frame,
   * src/receiver/admit.ts) and nothing more is buffered. Encrypted, `keys.received` says how
   * many of the peer's records those bytes were.
   */
  static fromSocketAfter(socket: net.Socket, consumed: number, keys?: WireKeys): FramedConnection {
    if (socket.bytesRead !== consumed || socket.readableLength > 0) {
      throw new LivemigError('ERR_LIVEMIG_PROTOCOL', `the connection was read past its first frame (${socket.bytesRead} bytes, ${consumed} expected)`, { phase: 'handshake' });
    }
    return FramedConnection.#takeOver(socket, [socket], 'the connection has no file descriptor: a migration needs a connected TCP or Unix socket', 'taking over the connection', keys);
  }

  /**
   * Takes over a connection on which a TLS handshake ran (src/security/tls.ts): `tls` must have
   * stopped reading with nothing of the peer's left unread (the handshake's closing exchange
   * sees to that). Its descriptor is duplicated into a native Wire, and the TLS socket is
   * destroyed without a close_notify, so the stream goes on in the clear for the native data
   * path (which is to carry its own records, keyed from the TLS session).
   */
  static fromSecured(raw: net.Socket, tls: net.Socket, keys: WireKeys): FramedConnection {
    if (tls.readableLength > 0) throw new LivemigError('ERR_LIVEMIG_PROTOCOL', 'the peer sent data before the secured stream was handed over', { phase: 'handshake' });
    return FramedConnection.#takeOver(raw, [tls, raw], 'the secured connection has no file descriptor', 'taking over the secured connection', keys);
  }

  /**
   * Duplicates `socket`'s descriptor into a native Wire (whose records are sealed with `keys`,
   * if given), then destroys `done` (Node's side of it).
   */
  static #takeOver(socket: net.Socket, done: net.Socket[], noFd: string, what: string, keys?: WireKeys): FramedConnection {
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', noFd, { phase: 'connect' });
    let wire: NativeWire;
    try {
      wire = keys ? new addon.Wire(fd, keys) : new addon.Wire(fd);
    } catch (e) {
      throw fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'connect', what);
    }
    for (const s of done) s.destroy();
    return new FramedConnection(wire);
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
    return this.#closed || this.#writeFailure !== undefined;
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

  /** Queues whole frames (a buffer each, or parts of one); resolves once the kernel has them. */
  send(frame: Buffer | Buffer[]): Promise<void> {
    let parts = Array.isArray(frame) ? frame : [frame];
    // A small frame with nothing ahead of it goes from this thread: a control message inside
    // the pause would otherwise wait for a pool thread to wake and for this loop to hear back.
    if (this.#writesPending === 0 && !this.#writeFailure && !this.#closed) {
      const total = parts.reduce((n, p) => n + p.length, 0);
      if (total <= SEND_NOW_MAX) {
        let sent: number;
        try {
          sent = this.#wire.writeNow(parts);
        } catch (e) {
          this.#writeFailure ??= fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', 'sending a frame');
          return Promise.reject(this.#writeFailure);
        }
        if (sent === total) return Promise.resolve();
        // encrypted: the frame was sealed whole and part of its record waits in the Wire
        parts = sent < 0 ? [] : remainder(parts, sent);
      }
    }
    return this.#write('sending a frame', () => this.#wire.write(parts));
  }

  /**
   * Sends pages straight from the region: PAGES frames, or with `flags` (SEND_ZERO, SEND_DEDUP;
   * needs `dedup`) PAGES_ENC frames with zero/dup/raw pages chosen in place. With `probe`, raw
   * pages that provably went out as hashed enter the dedup index (see native/wire/send_pages.cc).
   * With `now`, up to SEND_NOW_PAGES pages with nothing queued ahead go from the calling thread
   * (the last pages, inside the pause).
   */
  sendPages(req: SendPagesRequest): Promise<SendCounts> {
    const { region, pages, round, version, batchPages, hashes, dedup, flags = 0, probe } = req;
    if (batchPages < 1 || batchPages > MAX_BATCH_PAGES) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `batchPages must be within 1..${MAX_BATCH_PAGES}`, { phase: 'precopy' });
    if (flags !== 0 && dedup === undefined) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'encoded frames need the dedup index', { phase: 'precopy' });
    if (hashes.length < region.pageCount) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `the hash table has ${hashes.length} entries for ${region.pageCount} pages`, { phase: 'precopy' });
    const now = req.now === true && pages.length <= SEND_NOW_PAGES && this.#writesPending === 0 && !this.#writeFailure && !this.#closed;
    const call = { region: region.nativeHandle, pages, round, version, batchPages, hashes, flags, now, ...(dedup ? { dedup } : {}), ...(probe ? { probe } : {}) };
    if (now) {
      return this.#wire.sendPages(call).catch((e: unknown) => {
        this.#writeFailure ??= fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', 'sending pages');
        throw this.#writeFailure;
      });
    }
    return this.#write('sending pages', () => this.#wire.sendPages(call));
  }

  /** Sends one classified batch as a PAGES_ENC frame (see src/encoding/encoder.ts). */
  sendEncoded(batch: NativeSendEncoded): Promise<number> {
    return this.#write('sending pages', () => this.#wire.sendEncoded(batch));
  }

  /**
   * The next frame. With a sink, PAGES frames before it are applied to the sink's region.
   * `timeoutMs` bounds the wait for the frame as a whole; the connection is unusable after.
   */
  async next(timeoutMs?: number, sink?: PageSink): Promise<WireFrame> {
    if (this.#readAhead) {
      if (sink) throw new LivemigError('ERR_LIVEMIG_STATE', 'a read-ahead connection cannot take a page sink', { phase: 'transport' });
      return this.#fromQueue(timeoutMs);
    }
    if (this.#reading) throw new LivemigError('ERR_LIVEMIG_STATE', 'a read is already in progress on this connection', { phase: 'transport' });
    // A control frame that has already arrived is taken on this thread (no read is running)
    if (!this.#readFailure && !this.#closed) {
      let ready: NativeFrame | null = null;
      try {
        ready = this.#wire.readNow({ maxPayload: MAX_PAYLOAD, maxType: MAX_TYPE, limits: this.#limits });
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
        timer = setTimeout(() => {
          const e = new LivemigError('ERR_LIVEMIG_TIMEOUT', `no message from the peer within ${timeoutMs} ms`, { phase: 'transport' });
          this.#failBoth(e);
          this.#wire.shutdown(); // wakes the blocked read
          reject(e);
        }, timeoutMs);
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
    if (this.#readAhead) return;
    if (this.#reading) throw new LivemigError('ERR_LIVEMIG_STATE', 'a read is already in progress on this connection', { phase: 'transport' });
    this.#readAhead = true;
    const loop = async (): Promise<void> => {
      while (!this.#closed && !this.#readFailure) {
        let f: WireFrame;
        try {
          f = await this.#readOne();
        } catch {
          break; // recorded as the connection's failure by #readOne
        }
        const w = this.#waiters.shift();
        if (w) {
          w.resolve(f);
          continue;
        }
        this.#queue.push(f);
        this.#queuedBytes += f.payload.length;
        // a peer must not make us hold without bound what nobody asked for
        if (this.#queue.length > READ_AHEAD_MAX_FRAMES || this.#queuedBytes > READ_AHEAD_MAX_BYTES) {
          this.abort(new ProtocolError('ERR_LIVEMIG_PROTOCOL', `the peer sent ${this.#queue.length} frames (${this.#queuedBytes} bytes) that nobody has read: more than a migration ever needs queued`));
          break;
        }
      }
      for (const w of this.#waiters.splice(0)) w.reject(this.#readFailure ?? closedError());
    };
    void loop();
  }

  /** An ERROR frame the peer sent that nobody has read yet (read-ahead mode). */
  takeQueuedError(): Frame | undefined {
    const i = this.#queue.findIndex((f) => f.type === FrameType.Error);
    if (i < 0) return undefined;
    const [f] = this.#queue.splice(i, 1);
    this.#queuedBytes -= f!.payload.length;
    return f;
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
      if (last && !this.#writeFailure) await Promise.race([this.send(last), new Promise((r) => setTimeout(r, timeoutMs))]);
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
    for (const w of this.#waiters.splice(0)) w.reject(e);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#wire.close();
  }

  async #write(what: string, op: () => Promise<unknown>): Promise<never> {
    this.#writesPending++;
    const run = this.#writes.then(async () => {
      try {
        if (this.#writeFailure) throw this.#writeFailure;
        if (this.#closed) throw closedError();
        try {
          return await op();
        } catch (e) {
          this.#writeFailure ??= fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', what);
          throw this.#writeFailure;
        }
      } finally {
        // before the caller hears of it: its next frame may then go at once (see send)
        this.#writesPending--;
      }
    });
    this.#writes = run.catch(() => undefined);
    return run as Promise<never>;
  }

  async #readOne(sink?: PageSink): Promise<WireFrame> {
    if (this.#readFailure) throw this.#readFailure;
    if (this.#closed) throw closedError();
    try {
      const f = await this.#wire.read({
        maxPayload: MAX_PAYLOAD,
        maxType: MAX_TYPE,
        limits: this.#limits,
        ...(sink ? { sink: { region: sink.region.nativeHandle, hashes: sink.hashes, version: sink.version, maxBatchPages: MAX_BATCH_PAGES, encodings: sink.encodings === true, ...(sink.stripe ? sink.stripe : {}) } } : {}),
      });
      return { ...f, type: f.type as FrameType };
    } catch (e) {
      const err = fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'transport', 'receiving');
      if (err.phase === 'protocol') this.#readFailure ??= err;
      else this.#failBoth(err); // the connection itself is gone (or timed out)
      throw this.#readFailure;
    }
  }

  #fromQueue(timeoutMs?: number): Promise<WireFrame> {
    const f = this.#queue.shift();
    if (f) {
      this.#queuedBytes -= f.payload.length;
      return Promise.resolve(f);
    }
    if (this.#readFailure) return Promise.reject(this.#readFailure);
    if (this.#closed) return Promise.reject(closedError());
    return new Promise((resolve, reject) => {
      const w = { resolve, reject };
      this.#waiters.push(w);
      if (timeoutMs !== undefined) {
        setTimeout(() => {
          const i = this.#waiters.indexOf(w);
          if (i < 0) return;
          this.#waiters.splice(i, 1);
          const e = new LivemigError('ERR_LIVEMIG_TIMEOUT', `no message from the peer within ${timeoutMs} ms`, { phase: 'transport' });
          this.#failBoth(e);
          this.#wire.shutdown();
          reject(e);
        }, timeoutMs).unref();
      }
    });
  }

  #failBoth(e: LivemigError): void {
    // The first failure is the one that explains what happened; the errors of calls that a
    // shutdown woke up afterwards say less.
    this.#readFailure ??= e;
    this.#writeFailure ??= e;
  }
}

/** read-ahead holds at most this much that nobody asked for (a source needs a few ROUND_ACKs) */
const READ_AHEAD_MAX_FRAMES = 1024;
const READ_AHEAD_MAX_BYTES = 8 << 20;
/** frames up to this size may be written from the calling thread (see send) */
const SEND_NOW_MAX = 64 * 1024;
/** pages a sendPages call may send from the calling thread (4 MiB: well under a millisecond) */
const SEND_NOW_PAGES = 1024;

/** The parts of a frame after its first `sent` bytes. */
function remainder(parts: Buffer[], sent: number): Buffer[] {
  const rest: Buffer[] = [];
  for (const p of parts) {
    if (sent >= p.length) {
      sent -= p.length;
      continue;
    }
    rest.push(sent > 0 ? p.subarray(sent) : p);
    sent = 0;
  }
  return rest;
}

function closedError(): LivemigError {
  return new LivemigError('ERR_LIVEMIG_CONNECTION', 'the connection is closed', { phase: 'transport' });
}
