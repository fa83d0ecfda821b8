/**
 * Decides, from what it measures while running, whether encoding and compression pay.
 *
 * In-place encoding (zero pages, dups, pages the receiver holds) runs inside the native send
 * and costs a fraction of a microsecond per page (the zero check's first load, indexing); the
 * native side reports that time. It pays when the pages it saves times the time one raw page
 * takes to send exceed it: on a 1 Gbit/s link almost always, on loopback only if a sixth or so
 * of the pages are saved. When it does not pay, pages go as plain PAGES frames for a run of
 * batches that doubles while the answer stays the same, then one in-place probe re-measures.
 *
 * Compression needs a copy of every page and a compressor that keeps up. It pays when the
 * compressor outruns the link (it runs beside the sending) and the pages it is given shrink.
 * The chooser keeps exponentially weighted figures of the link (wire bytes per ms of send),
 * the compressor (input bytes per ms) and the ratio. While batches go out uncompressed it
 * samples a few pages at growing intervals and compresses them off to the side, so its
 * compressor figures stay current at a cost of well under 1%.
 */
const ALPHA = 0.25;
/** compress only if the compressor is this much faster than the link */
const SPEED_MARGIN = 1.2;
/** and recent compressible pages came out at most this fraction of their size */
const MAX_RATIO = 0.9;
/** and at least this share of nonzero pages looked compressible */
const MIN_CANDIDATES = 0.05;
/** batches between samples: starts here, doubles while the answer stays "do not compress" */
const FIRST_SAMPLE_GAP = 8;
const MAX_SAMPLE_GAP = 256;
/** plain runs (in batches) while in-place encoding does not pay: first, and longest */
const FIRST_PLAIN_RUN = 16;
const MAX_PLAIN_RUN = 256;

const ewma = (old: number | undefined, x: number): number => (old === undefined ? x : old + ALPHA * (x - old));

export interface ChooserOptions {
  zero: boolean;
  dedup: boolean;
  compress: boolean;
}

export class Chooser {
  readonly options: ChooserOptions;
  linkMBps: number | undefined;
  compressMBps: number | undefined;
  ratio: number | undefined;
  /** share of sampled nonzero pages that looked compressible */
  candidates: number | undefined;
  /** share of pages the in-place path saved, its overhead per page, and ms per raw page sent */
  savedShare: number | undefined;
  overheadMsPerPage: number | undefined;
  msPerRawPage: number | undefined;
  #batches = 0;
  #nextSample = 0;
  #sampleGap = FIRST_SAMPLE_GAP;
  #plainRun = FIRST_PLAIN_RUN;

  constructor(options: ChooserOptions) {
    this.options = options;
  }

  /** Whether in-place encoding pays, from the figures so far (yes until measured). */
  inPlacePays(): boolean {
    if (this.savedShare === undefined || this.overheadMsPerPage === undefined || this.msPerRawPage === undefined) return true;
    return this.savedShare * this.msPerRawPage > this.overheadMsPerPage;
  }

  /** How many batches the next plain run spans; doubles each time in-place did not pay. */
  nextPlainRun(): number {
    const run = this.#plainRun;
    this.#plainRun = Math.min(this.#plainRun * 2, MAX_PLAIN_RUN);
    return run;
  }

  /** An in-place call sent `pages`, saved `saved`, sent `raw` raw, took `ms` with `overheadMs` of encoding work. */
  inPlace(pages: number, saved: number, raw: number, ms: number, overheadMs: number): void {
    if (pages < 64) return;
    this.savedShare = ewma(this.savedShare, saved / pages);
    this.overheadMsPerPage = ewma(this.overheadMsPerPage, overheadMs / pages);
    if (raw >= 64) this.msPerRawPage = ewma(this.msPerRawPage, Math.max(ms - overheadMs, 0) / raw);
    if (this.inPlacePays()) this.#plainRun = FIRST_PLAIN_RUN;
  }

  /** A plain call sent `pages` raw pages in `ms`. */
  plain(pages: number, ms: number): void {
    if (pages >= 64) this.msPerRawPage = ewma(this.msPerRawPage, ms / pages);
  }

  /** Whether the next batches go through the compressor. */
  compressing(): boolean {
    if (!this.options.compress || this.compressMBps === undefined || this.ratio === undefined || this.linkMBps === undefined) return false;
    if ((this.candidates ?? 0) < MIN_CANDIDATES) return false;
    return this.ratio <= MAX_RATIO && this.compressMBps >= this.linkMBps * SPEED_MARGIN;
  }

  /** Whether to sample the next batch's pages before sending it uncompressed. */
  wantSample(): boolean {
    return this.options.compress && this.#batches >= this.#nextSample;
  }

  /** `n` batches went out; `compressed` whether through the compressor. */
  advance(n: number): void {
    this.#batches += n;
  }

  /** A sample of `nonzero` pages had `candidates` that looked compressible. */
  sampled(nonzero: number, candidates: number): void {
    if (nonzero > 0) this.candidates = ewma(this.candidates, candidates / nonzero);
    if (this.compressing()) this.#sampleGap = FIRST_SAMPLE_GAP;
    else this.#sampleGap = Math.min(this.#sampleGap * 2, MAX_SAMPLE_GAP);
    this.#nextSample = this.#batches + this.#sampleGap;
  }

  /** A frame went out: `bytes` in `ms` of writing to the socket. */
  sent(bytes: number, ms: number): void {
    if (bytes < 64 * 1024) return; // too small to say anything about the link
    this.linkMBps = ewma(this.linkMBps, bytes / 1e3 / Math.max(ms, 0.01));
  }

  compressed(input: number, output: number, ms: number): void {
    if (input === 0) return;
    this.compressMBps = ewma(this.compressMBps, input / 1e3 / Math.max(ms, 0.01));
    this.ratio = ewma(this.ratio, output / input);
  }

  describe(): string {
    const f = (x: number | undefined, d = 0): string => (x === undefined ? '-' : x.toFixed(d));
    return `in-place saves ${f(this.savedShare, 2)} of pages at ${f((this.overheadMsPerPage ?? NaN) * 1e3, 3)} us/page vs ${f((this.msPerRawPage ?? NaN) * 1e3, 3)} us per raw page -> ${this.inPlacePays() ? 'in place' : 'plain'}; link ${f(this.linkMBps)} MB/s, lz4 ${f(this.compressMBps)} MB/s ratio ${f(this.ratio, 2)} candidates ${f(this.candidates, 2)} -> ${this.compressing() ? 'compress' : 'plain'}`;
  }
}
