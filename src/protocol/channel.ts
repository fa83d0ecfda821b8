/**
 * A framed, ordered message channel over a net.Socket: frames in via FrameParser into a queue
 * that the state machines read with next(); frames out with send(). Reading pauses when the
 * consumer falls behind. A parse error or a closed socket fails every waiting reader.
 */
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { ProtocolError } from './errors.js';
import { FrameParser, FrameType, type Frame } from './frame.js';

interface Waiter {
  resolve: (f: Frame) => void;
  reject: (e: Error) => void;
  timer?: NodeJS.Timeout;
}

const HIGH_WATER_FRAMES = 16;
const LOW_WATER_FRAMES = 4;

export class FrameChannel {
  readonly socket: net.Socket;
  #parser: FrameParser;
  #queue: Frame[] = [];
  #waiter: Waiter | undefined;
  #failure: Error | undefined;
  #paused = false;

  constructor(socket: net.Socket, allocate?: (length: number) => Buffer) {
    this.socket = socket;
    this.#parser = new FrameParser(allocate);
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      try {
        this.#parser.push(chunk, (f) => this.#deliver(f));
      } catch (e) {
        this.#fail(e as Error);
        socket.destroy();
      }
    });
    socket.on('error', (e) => this.#fail(new LivemigError('ERR_LIVEMIG_CONNECTION', `connection failed: ${e.message}`, { phase: 'transport', cause: e })));
    socket.on('close', () => this.#fail(new LivemigError('ERR_LIVEMIG_CONNECTION', 'the peer closed the connection', { phase: 'transport' })));
  }

  get closed(): boolean {
    return this.#failure !== undefined;
  }

  /** The next frame, in order. Rejects once the stream failed and the queue is empty. */
  next(timeoutMs?: number): Promise<Frame> {
    const f = this.#queue.shift();
    if (f) {
      if (this.#paused && this.#queue.length <= LOW_WATER_FRAMES) {
        this.#paused = false;
        this.socket.resume();
      }
      return Promise.resolve(f);
    }
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      const w: Waiter = { resolve, reject };
      if (timeoutMs !== undefined) {
        w.timer = setTimeout(() => {
          this.#waiter = undefined;
          reject(new LivemigError('ERR_LIVEMIG_TIMEOUT', `no message from the peer within ${timeoutMs} ms`, { phase: 'transport' }));
        }, timeoutMs);
      }
      this.#waiter = w;
    });
  }

  /** Waits for a frame of `type`; an ERROR frame from the peer becomes `onError`'s error. */
  async expect(type: FrameType, onError: (f: Frame) => Error, timeoutMs?: number): Promise<Frame> {
    const f = await this.next(timeoutMs);
    if (f.type === type) return f;
    if (f.type === FrameType.Error) throw onError(f);
    throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `expected ${FrameType[type]}, got ${FrameType[f.type]}`);
  }

  /** Queues bytes; resolves once the kernel has taken them (the buffer may then be reused). */
  send(buf: Buffer): Promise<void> {
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      this.socket.write(buf, (err) => (err ? reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `send failed: ${err.message}`, { phase: 'transport', cause: err })) : resolve()));
    });
  }

  /** Bytes handed to the socket but not yet to the kernel. */
  get backlog(): number {
    return this.socket.writableLength;
  }

  close(): void {
    this.socket.end();
    this.socket.destroySoon?.();
  }

  destroy(): void {
    this.socket.destroy();
  }

  #deliver(f: Frame): void {
    const w = this.#waiter;
    if (w) {
      this.#waiter = undefined;
      if (w.timer) clearTimeout(w.timer);
      w.resolve(f);
      return;
    }
    this.#queue.push(f);
    if (!this.#paused && this.#queue.length >= HIGH_WATER_FRAMES) {
      this.#paused = true;
      this.socket.pause();
    }
  }

  #fail(e: Error): void {
    if (this.#failure) return;
    this.#failure = e;
    const w = this.#waiter;
    if (w) {
      this.#waiter = undefined;
      if (w.timer) clearTimeout(w.timer);
      w.reject(e);
    }
  }
}
