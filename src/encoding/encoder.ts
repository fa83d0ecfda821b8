/**
 * The sender's page encoder. Two paths, chosen by the chooser (which only decides compression):
 * - in place (the usual one): native sendPages writes PAGES_ENC frames straight from the
 *   region, with zero pages and dups found in place and the rest sent raw (entering the dedup
 *   index when the tracker shows they went out as hashed); PAGES frames when every encoding is off;
 * - compressed: per batch, classify (native: copy, hash, zero/dup/skip against the sender's
 *   index, sample compressibility), compress the pages that look compressible (two worker
 *   threads, lz4-napi), then one PAGES_ENC frame. Classifying and compressing the next batch
 *   overlap the sending of the previous one (two buffer sets).
 */
import { addon, call, callAsync, type NativeDedup } from '../native.js';
import { trace, tracing } from '../trace.js';
import { ChooserEvent } from '../trace-events.js';
import { PageEncoding } from '../protocol/format.js';
import type { FramedConnection } from '../protocol/connection.js';
import { SEND_DEDUP, SEND_ZERO, type SendPagesRequest } from '../protocol/wire.js';
import type { Region } from '../region/region.js';
import { Chooser, type ChooserOptions, type LinkFigure } from './chooser.js';
import { Compressor } from './compressor.js';
import type { EncodingStats } from './stats.js';

export type { EncodingStats } from './stats.js';

const SKIP = 255;
const INCOMPRESSIBLE = 254;
/**
 * batches per native call on the in-place and plain paths: starts here, doubles while the
 * path stays the same (each call's return costs a wake-up of the event loop and a refilled
 * socket on a 2-core host)
 */
const RUN_BATCHES = 16;
const MAX_RUN_BATCHES = 256;
const COMPRESS_RUN = 8;
/** pages compressed together as one LZ4 block (protocol maximum: 4) */
const LZ4_GROUP = 4;
/** pages compressed off to the side per sample while not compressing */
const SAMPLE_PAGES = 32;

export interface PageEncoderOptions {
  region: Region;
  conn: FramedConnection;
  /** per-page hashes of what was sent */
  hashes: BigUint64Array;
  /** the index of what the receiver holds, shared with the native sender */
  dedup: NativeDedup;
  encodings: ChooserOptions;
  version: number;
  batchPages: number;
  /** the link as all channels measured it so far (the chooser judges compression from it) */
  link?: () => LinkFigure | undefined;
  /** each run's bytes and pages as they went: the link figure and progress grow during a long call, not after it */
  onSent?: (bytes: number, pages: number) => void;
  /** a compressor already started (CompressorPool), now this encoder's to close */
  compressor?: Compressor;
}

interface BufferSet {
  staging: SharedArrayBuffer;
  output: SharedArrayBuffer;
  lengths: SharedArrayBuffer;
}

/** Pages of one round to send. */
export interface RoundPages {
  round: number;
  /** ascending */
  pages: Uint32Array;
  /** the stop-and-copy's pages, inside the pause */
  final?: boolean;
}

export class PageEncoder {
  readonly chooser: Chooser;
  readonly stats: EncodingStats = { zero_pages: 0, dup_pages: 0, lz4_pages: 0, raw_pages: 0, skipped_pages: 0, lz4_in: 0, lz4_out: 0 };
  readonly #region: Region;
  readonly #conn: FramedConnection;
  readonly #hashes: BigUint64Array;
  readonly #dedup: NativeDedup;
  readonly #version: number;
  readonly #batchPages: number;
  readonly #flags: number;
  readonly #sets: BufferSet[];
  #compressor: Compressor | undefined;
  #sampling: Promise<void> | undefined;
  #runBatches = RUN_BATCHES;
  #inPlaceMs = 0;
  #overheadMs = 0;
  #indexMs = 0;
  #sendWallMs = 0;
  #inPlacePages = 0;
  readonly #sampleSet: BufferSet;
  readonly #zeroHash = call('ERR_LIVEMIG_SYSCALL', 'handshake', 'the zero page hash', () => addon.zeroPageHash());

  readonly #onSent: (bytes: number, pages: number) => void;

  constructor(o: PageEncoderOptions) {
    const { region, conn, hashes, dedup, encodings: options, version, batchPages } = o;
    this.#onSent = o.onSent ?? (() => undefined);
    this.#compressor = o.compressor;
    this.#region = region;
    this.#conn = conn;
    this.#hashes = hashes;
    this.#dedup = dedup;
    this.#version = version;
    this.#batchPages = batchPages;
    this.#flags = (options.zero ? SEND_ZERO : 0) | (options.dedup ? SEND_DEDUP : 0);
    this.chooser = new Chooser(options, o.link);
    const bytes = batchPages * region.pageSize;
    this.#sets = [0, 1].map(() => ({
      staging: new SharedArrayBuffer(bytes),
      output: new SharedArrayBuffer(bytes),
      lengths: new SharedArrayBuffer(batchPages * 4),
    }));
    const sampleBytes = SAMPLE_PAGES * region.pageSize;
    this.#sampleSet = {
      staging: new SharedArrayBuffer(sampleBytes),
      output: new SharedArrayBuffer(sampleBytes),
      lengths: new SharedArrayBuffer(SAMPLE_PAGES * 4),
    };
  }

  /**
   * Sends `pages` for `round`; resolves to the bytes written.
   * `final`: the stop-and-copy's pages, inside the pause. Unless the link is slow enough that
   * they are being compressed, they go in one in-place call with no learning (no samples or
   * timings: nothing follows them).
   */
  async send(o: RoundPages): Promise<number> {
    const { round, pages, final = false } = o;
    if (final && !this.chooser.compressing()) {
      const c = await this.#conn.sendPages({ ...this.#call(round, pages), dedup: this.#dedup, flags: this.#flags, now: true });
      this.#countSent(c);
      return c.bytes;
    }
    const tSend = performance.now();
    let bytes = 0;
    for (let at = 0; at < pages.length;) {
      const compress = this.chooser.compressing();
      // runs grow while they stay in place on a link compression cannot help (each call's
      // return costs a wake-up of the event loop); on a slower link they stay short, so that
      // samples and the switch to compressing happen at run starts
      if (!compress && this.chooser.compressionOutOfReach()) this.#runBatches = Math.min(this.#runBatches * 2, MAX_RUN_BATCHES);
      else this.#runBatches = RUN_BATCHES;
      const part = pages.subarray(at, Math.min(pages.length, at + (compress ? COMPRESS_RUN : this.#runBatches) * this.#batchPages));
      at += part.length;
      if (compress) {
        const b = await this.#sendCompressed(round, part);
        bytes += b;
        this.#onSent(b, part.length);
      } else {
        if (this.chooser.wantSample()) this.#sample(part);
        const b = await this.#sendInPlace(round, part);
        bytes += b;
        this.#onSent(b, part.length);
      }
      this.chooser.advance(Math.ceil(part.length / this.#batchPages));
    }
    this.#sendWallMs += performance.now() - tSend;
    if (tracing('chooser')) {
      trace('chooser', ChooserEvent.roundSent, {
        round,
        wall_ms: +this.#sendWallMs.toFixed(1),
        in_place_pages: this.#inPlacePages,
        in_place_ms: +this.#inPlaceMs.toFixed(1),
        overhead_ms: +this.#overheadMs.toFixed(1),
        index_ms: +this.#indexMs.toFixed(1),
        chooser: this.chooser.describe(),
        ...this.stats,
      });
    }
    return bytes;
  }

  /** The parts of every sendPages call this encoder makes. */
  #call(round: number, pages: Uint32Array): SendPagesRequest {
    return { region: this.#region, pages, round, version: this.#version, batchPages: this.#batchPages, hashes: this.#hashes };
  }

  /**
   * PAGES_ENC frames straight from the region, zero pages and dups found in place (with every
   * encoding off: PAGES frames).
   */
  async #sendInPlace(round: number, pages: Uint32Array): Promise<number> {
    const t0 = performance.now();
    const c = await this.#conn.sendPages({ ...this.#call(round, pages), dedup: this.#dedup, flags: this.#flags });
    const ms = performance.now() - t0;
    if (this.#flags !== 0) this.chooser.encoded(pages.length, c.zero + c.dup + c.skipped);
    this.#inPlaceMs += ms;
    this.#overheadMs += c.overheadMs;
    this.#indexMs += c.indexMs;
    this.#inPlacePages += pages.length;
    this.#countSent(c);
    return c.bytes;
  }

  #countSent(c: { zero: number; dup: number; skipped: number; raw: number }): void {
    this.stats.zero_pages += c.zero;
    this.stats.dup_pages += c.dup;
    this.stats.skipped_pages += c.skipped;
    this.stats.raw_pages += c.raw;
  }

  /**
   * Compresses a few of these pages off to the side, to keep the compressor figures current.
   * Does not hold up the sending: the copy is taken now, the compression finishes whenever the
   * worker does, and no new sample starts while one is in flight.
   */
  #sample(pages: Uint32Array): void {
    if (this.#sampling) return;
    const n = Math.min(SAMPLE_PAGES, pages.length);
    const step = Math.max(1, Math.floor(pages.length / n));
    const picked = Uint32Array.from({ length: n }, (_, k) => pages[k * step]!);
    const kind = call('ERR_LIVEMIG_SYSCALL', 'precopy', 'sampling pages', () =>
      addon.samplePages(this.#region.nativeHandle, picked, Buffer.from(this.#sampleSet.staging)),
    );
    const slots: number[] = [];
    let nonzero = 0;
    for (let k = 0; k < n; k++) {
      if (kind[k] !== 0) nonzero++;
      if (kind[k] === 2) slots.push(k);
    }
    if (slots.length === 0) {
      this.chooser.sampled(nonzero, 0);
      return;
    }
    this.#compressor ??= new Compressor();
    // (sampled pages are not neighbours: one page a group, a slightly pessimistic ratio)
    this.#sampling = this.#compressor
      .compress({ ...this.#sampleSet, groups: Uint32Array.from(slots.flatMap((k) => [k, 1])), pageSize: this.#region.pageSize })
      .then((r) => {
        this.chooser.compressed(r.input, r.output, r.ms);
        this.chooser.sampled(nonzero, slots.length);
      })
      .finally(() => (this.#sampling = undefined));
    this.#sampling.catch(() => undefined); // a failed sample leaves the figures as they were; close() reports the worker
  }

  async #sendCompressed(round: number, pages: Uint32Array): Promise<number> {
    const ps = this.#region.pageSize;
    const classifyFlags = this.#flags | 4;
    await this.#sampling; // the worker takes one job at a time
    let bytes = 0;
    let inflight: Promise<void> = Promise.resolve();
    let slot = 0;
    try {
      for (let at = 0; at < pages.length; at += this.#batchPages) {
        const batch = pages.subarray(at, Math.min(at + this.#batchPages, pages.length));
        const set = this.#sets[slot]!;
        slot ^= 1;
        const staging = Buffer.from(set.staging);
        // per page: a dup's source page (from classify), or an lz4 page's length (compressor)
        const lengths = new Int32Array(set.lengths);
        lengths.fill(0, 0, batch.length);
        const enc = await callAsync('ERR_LIVEMIG_SYSCALL', 'precopy', 'classifying pages', () =>
          addon.classifyPages(this.#region.nativeHandle, batch, staging, this.#hashes, this.#dedup, classifyFlags, lengths),
        );
        const candidates: number[] = [];
        let nonzero = 0;
        for (let k = 0; k < enc.length; k++) {
          if (enc[k] === PageEncoding.Raw) candidates.push(k);
          if (enc[k] === PageEncoding.Raw || enc[k] === INCOMPRESSIBLE) nonzero++;
        }
        if (candidates.length > 0) {
          this.#compressor ??= new Compressor();
          // runs of neighbouring candidates (in frame order) compress as one block, up to LZ4_GROUP
          const groups: number[] = [];
          for (let i = 0; i < candidates.length;) {
            let g = 1;
            while (g < LZ4_GROUP && i + g < candidates.length && candidates[i + g] === candidates[i]! + g) g++;
            groups.push(candidates[i]!, g);
            i += g;
          }
          const r = await this.#compressor.compress({ ...set, groups: Uint32Array.from(groups), pageSize: ps });
          this.chooser.compressed(r.input, r.output, r.ms);
          for (let i = 0; i < groups.length; i += 2) {
            const k = groups[i]!;
            if (lengths[k]! <= 0) continue;
            enc[k] = PageEncoding.Lz4;
            for (let j = 1; j < groups[i + 1]!; j++) enc[k + j] = PageEncoding.Lz4Cont;
          }
        }
        this.chooser.sampled(nonzero, candidates.length);
        this.chooser.encoded(batch.length, batch.length - nonzero);
        this.#count(enc, lengths, batch);
        await inflight;
        // (no link figure from these: a frame this small may just fill the socket buffer)
        inflight = this.#conn
          .sendEncoded({ pages: batch, encodings: enc, staging, lz4: Buffer.from(set.output), lengths, hashes: this.#hashes, round, version: this.#version })
          .then((b) => {
            bytes += b;
          });
        inflight.catch(() => undefined); // awaited on the next batch or below
      }
    } finally {
      await inflight;
    }
    return bytes;
  }

  #count(enc: Uint8Array, lengths: Int32Array, pages: Uint32Array): void {
    const ps = this.#region.pageSize;
    for (let k = 0; k < enc.length; k++) {
      const e = enc[k];
      // a zero page the receiver holds as zero (a fresh region's) counts with the zero pages
      if (e === SKIP && this.#hashes[pages[k]!] === this.#zeroHash) this.stats.zero_pages++;
      else if (e === SKIP) this.stats.skipped_pages++;
      else if (e === PageEncoding.Zero) this.stats.zero_pages++;
      else if (e === PageEncoding.Dup) this.stats.dup_pages++;
      else if (e === PageEncoding.Lz4) {
        this.stats.lz4_pages++;
        this.stats.lz4_in += ps;
        this.stats.lz4_out += lengths[k]!;
      } else if (e === PageEncoding.Lz4Cont) {
        this.stats.lz4_pages++;
        this.stats.lz4_in += ps; // its compressed bytes are counted with the block's first page
      } else this.stats.raw_pages++;
    }
  }

  /**
   * Readies what the first round would otherwise set up in its first milliseconds, where it
   * competes with the guest for the CPU: the compressor's threads (two V8 isolates) and the
   * first touch of the staging buffers. The sender calls it while the destination reserves.
   */
  async prepare(): Promise<void> {
    for (const set of [...this.#sets, this.#sampleSet]) for (const b of [set.staging, set.output, set.lengths]) new Uint8Array(b).fill(0);
    if (!this.chooser.options.compress) return;
    this.#compressor ??= new Compressor();
    await this.#compressor.ready();
  }

  async close(): Promise<void> {
    await this.#sampling;
    await this.#compressor?.close();
  }
}
