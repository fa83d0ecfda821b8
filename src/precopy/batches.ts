/**
 * Sends a list of pages as PAGES frames of up to `batchPages` each. Gathering (copy + hash of
 * the copy, native, on the thread pool) overlaps with the socket writing earlier batches; the
 * frame buffers are reused so steady-state sending allocates nothing.
 */
import { addon, callAsync } from '../native.js';
import type { Region } from '../region/region.js';
import type { FrameChannel } from '../protocol/channel.js';
import { pagesDataOffset, pagesFrameBytes, writePagesPrefix } from '../protocol/messages.js';

/** Batches gathered or on the wire at once; enough to keep the socket busy while the next gathers. */
const PIPELINE_DEPTH = 4;

export class BatchSender {
  readonly #region: Region;
  readonly #channel: FrameChannel;
  readonly #hashes: BigUint64Array;
  readonly #batchPages: number;
  readonly #version: number;
  readonly #free: Buffer[] = [];
  bytesSent = 0;
  pagesSent = 0;

  constructor(region: Region, channel: FrameChannel, hashes: BigUint64Array, batchPages: number, version: number) {
    this.#region = region;
    this.#channel = channel;
    this.#hashes = hashes;
    this.#batchPages = batchPages;
    this.#version = version;
    for (let i = 0; i < PIPELINE_DEPTH + 1; i++) this.#free.push(Buffer.alloc(pagesFrameBytes(batchPages, region.pageSize)));
  }

  /** Sends `pages` (ascending page indices) tagged with `round`; resolves when all are written to the kernel. */
  async send(round: number, pages: Uint32Array): Promise<number> {
    const before = this.bytesSent;
    const inflight: Promise<void>[] = [];
    let writeChain: Promise<void> = Promise.resolve();
    for (let start = 0; start < pages.length; start += this.#batchPages) {
      const batch = pages.subarray(start, Math.min(start + this.#batchPages, pages.length));
      while (this.#free.length === 0) await Promise.race(inflight);
      const full = this.#free.pop()!;
      const frameBytes = pagesFrameBytes(batch.length, this.#region.pageSize);
      const frame = frameBytes === full.length ? full : full.subarray(0, frameBytes);
      writePagesPrefix(frame, round, batch, this.#region.pageSize, this.#version);
      const gathered = callAsync('ERR_LIVEMIG_SYSCALL', 'precopy', 'gathering pages', () =>
        addon.gatherPages(this.#region.nativeHandle, batch, frame.subarray(pagesDataOffset(batch.length)), this.#hashes),
      );
      // writes stay in batch order; each waits for its own gather and the previous write
      writeChain = Promise.all([gathered, writeChain]).then(() => {
        this.bytesSent += frame.length;
        this.pagesSent += batch.length;
        return this.#channel.send(frame);
      });
      const done: Promise<void> = writeChain.then(
        () => {
          this.#free.push(full);
          inflight.splice(inflight.indexOf(done), 1);
        },
        (e: unknown) => {
          this.#free.push(full);
          inflight.splice(inflight.indexOf(done), 1);
          throw e;
        },
      );
      done.catch(() => undefined); // observed through race()/all() below; this only marks it handled
      inflight.push(done);
    }
    await Promise.all(inflight);
    return this.bytesSent - before;
  }
}

/** Merges two ascending page lists into one without duplicates. */
export function mergePages(a: Uint32Array, b: Uint32Array): Uint32Array {
  if (a.length === 0) return b;
  if (b.length === 0) return a;
  const out = new Uint32Array(a.length + b.length);
  let i = 0;
  let j = 0;
  let n = 0;
  while (i < a.length && j < b.length) {
    const x = a[i]!;
    const y = b[j]!;
    if (x < y) {
      out[n++] = x;
      i++;
    } else if (y < x) {
      out[n++] = y;
      j++;
    } else {
      out[n++] = x;
      i++;
      j++;
    }
  }
  while (i < a.length) out[n++] = a[i++]!;
  while (j < b.length) out[n++] = b[j++]!;
  return out.subarray(0, n);
}
