/**
 * The sender's encoded path: per batch, classify (native: zero check in place, copy, hash,
 * skip/zero/dup against the mirrored dedup index), optionally compress the raw pages (worker
 * thread, lz4-napi), then send one PAGES_ENC frame. Classifying and compressing the next batch
 * overlap the sending of the previous one (two buffer sets). When the chooser finds encoding
 * does not pay, batches go out plain, straight from the region.
 */
import { addon, callAsync } from '../native.js';
import { PageEncoding } from '../protocol/messages.js';
import type { NativeDedup, WireChannel } from '../protocol/wire.js';
import type { Region } from '../region/region.js';
import { Chooser, type ChooserOptions } from './chooser.js';
import { Compressor } from './compressor.js';

const SKIP = 255;

export interface EncodingStats {
  zero_pages: number;
  dup_pages: number;
  lz4_pages: number;
  raw_pages: number;
  /** pages the receiver already held in place (a kept image, or zero pages of a fresh region) */
  skipped_pages: number;
  /** bytes of pages that went out compressed, before and after */
  lz4_in: number;
  lz4_out: number;
}

interface BufferSet {
  staging: SharedArrayBuffer;
  output: SharedArrayBuffer;
  lengths: SharedArrayBuffer;
}

export class PageEncoder {
  readonly chooser: Chooser;
  readonly stats: EncodingStats = { zero_pages: 0, dup_pages: 0, lz4_pages: 0, raw_pages: 0, skipped_pages: 0, lz4_in: 0, lz4_out: 0 };
  readonly #region: Region;
  readonly #channel: WireChannel;
  readonly #hashes: BigUint64Array;
  readonly #dedup: NativeDedup;
  readonly #version: number;
  readonly #batchPages: number;
  readonly #sets: BufferSet[];
  #compressor: Compressor | undefined;

  constructor(region: Region, channel: WireChannel, hashes: BigUint64Array, dedup: NativeDedup, options: ChooserOptions, version: number, batchPages: number) {
    this.#region = region;
    this.#channel = channel;
    this.#hashes = hashes;
    this.#dedup = dedup;
    this.#version = version;
    this.#batchPages = batchPages;
    this.chooser = new Chooser(options);
    const bytes = batchPages * region.pageSize;
    this.#sets = [0, 1].map(() => ({ staging: new SharedArrayBuffer(bytes), output: new SharedArrayBuffer(bytes), lengths: new SharedArrayBuffer(batchPages * 4) }));
  }

  /** Sends `pages` for `round`; resolves to the bytes written. */
  async send(round: number, pages: Uint32Array): Promise<number> {
    const ps = this.#region.pageSize;
    let bytes = 0;
    let inflight: Promise<void> = Promise.resolve();
    let slot = 0;
    for (let start = 0; start < pages.length; ) {
      const seg = this.chooser.beginSegment();
      const end = Math.min(pages.length, start + Math.min(seg.batches, pages.length) * this.#batchPages);
      const segment = pages.subarray(start, end);
      start = end;
      if (!seg.encoded) {
        // plain: one native call for the whole segment, straight from the region
        const t0 = performance.now();
        const b = await this.#channel.sendPages(this.#region, segment, round, this.#version, this.#batchPages, this.#hashes, this.#dedup);
        this.chooser.sent(b, performance.now() - t0);
        this.chooser.endSegment(segment.length);
        this.stats.raw_pages += segment.length;
        bytes += b;
        continue;
      }
      for (let at = 0; at < segment.length; at += this.#batchPages) {
        const batch = segment.subarray(at, Math.min(at + this.#batchPages, segment.length));
        const set = this.#sets[slot]!;
        slot ^= 1;
        const staging = Buffer.from(set.staging);
        const enc = await callAsync('ERR_LIVEMIG_SYSCALL', 'precopy', 'classifying pages', () =>
          addon.classifyPages(this.#region.nativeHandle, batch, staging, this.#hashes, this.#dedup, (this.chooser.options.zero ? 1 : 0) | (this.chooser.options.dedup ? 2 : 0)),
        );
        const lengths = new Int32Array(set.lengths);
        lengths.fill(0, 0, batch.length);
        const raw: number[] = [];
        for (let k = 0; k < enc.length; k++) if (enc[k] === PageEncoding.Raw) raw.push(k);
        if (raw.length > 0 && this.chooser.compressNext()) {
          this.#compressor ??= new Compressor();
          const r = await this.#compressor.compress(set.staging, set.output, set.lengths, Uint32Array.from(raw), ps);
          this.chooser.compressed(r.input, r.output, r.ms);
          if (this.chooser.compressing()) {
            for (const k of raw) if (lengths[k]! > 0) enc[k] = PageEncoding.Lz4;
          }
        }
        this.#count(enc, lengths);
        await inflight;
        const t0 = performance.now();
        inflight = this.#channel.sendEncoded(batch, enc, staging, Buffer.from(set.output), lengths, this.#hashes, round, this.#version).then((b) => {
          this.chooser.sent(b, performance.now() - t0);
          this.chooser.encoded(batch.length * ps, b);
          bytes += b;
        });
        inflight.catch(() => undefined); // awaited on the next batch or below
      }
      await inflight;
      this.chooser.endSegment(segment.length);
    }
    await inflight;
    if (process.env.LIVEMIG_DEBUG_CHOOSER) console.error(`chooser round ${round}: encoded ${this.chooser.encodedRate?.toFixed(1)} plain ${this.chooser.plainRate?.toFixed(1)} pages/ms, link ${this.chooser.linkMBps?.toFixed(0)} MB/s, lz4 ${this.chooser.compressMBps?.toFixed(0)} MB/s ratio ${this.chooser.ratio?.toFixed(2)}`, JSON.stringify(this.stats));
    return bytes;
  }

  #count(enc: Uint8Array, lengths: Int32Array): void {
    const ps = this.#region.pageSize;
    for (let k = 0; k < enc.length; k++) {
      const e = enc[k];
      if (e === SKIP) this.stats.skipped_pages++;
      else if (e === PageEncoding.Zero) this.stats.zero_pages++;
      else if (e === PageEncoding.Dup) this.stats.dup_pages++;
      else if (e === PageEncoding.Lz4) {
        this.stats.lz4_pages++;
        this.stats.lz4_in += ps;
        this.stats.lz4_out += lengths[k]!;
      } else this.stats.raw_pages++;
    }
  }

  async close(): Promise<void> {
    await this.#compressor?.close();
  }
}
