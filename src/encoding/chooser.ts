/**
 * Decides, from what it measures while running, whether encoding and compression pay.
 *
 * In-place encoding (zero pages, dups, pages the receiver holds) runs inside the native send:
 * it reads every zero page whole and hashes possible dups before sending, and indexes what it
 * sent. It pays when the pages it saves outweigh that work, which depends on the content and
 * on how fast the link is. The chooser measures it: the throughput (pages per ms, the work done
 * whichever way) of in-place runs and of plain runs (PAGES frames, no encoding work), runs the
 * faster and probes the other for one run at doubling intervals.
 *
 * Compression needs a copy of every page and a compressor that keeps up. It pays when the
 * region moves faster with it: the link carries fewer bytes, but the compressor (beside the
 * sending) must keep up with the pages it is given, those that look compressible.
 * The chooser keeps exponentially weighted figures of the link (wire bytes per ms of send),
 * the compressor (input bytes per ms) and the ratio. While batches go out uncompressed it
 * samples a few pages at growing intervals and compresses them off to the side, so its
 * compressor figures stay current at a cost of well under 1%.
 */
const ALPHA = 0.25;
/** compress only if that moves region bytes this much faster than not compressing */
const SPEED_MARGIN = 1.1;
/** and recent compressible pages came out at most this fraction of their size */
const MAX_RATIO = 0.9;
/** and at least this share of nonzero pages looked compressible */
const MIN_CANDIDATES = 0.05;
/** batches between samples: starts here, doubles while the answer stays "do not compress" */
const FIRST_SAMPLE_GAP = 8;
/** what lz4-napi compresses per thread here before anything is measured (bench: ~100-250 MB/s) */
const ASSUMED_COMPRESS_MBPS = 250;
const MAX_SAMPLE_GAP = 256;
/** runs (of RUN_BATCHES batches) between probes of the slower of in-place and plain: first, longest */
const FIRST_PROBE_GAP = 4;
const MAX_PROBE_GAP = 64;
/** one path this much faster than the other is a clear win: its probes get rarer faster */
const CLEAR_WIN = 1.3;
const LINK_PROBE_EVERY = 64;
/** a plain run cannot be faster when in place leaves out at least this share of the pages */
const NO_PLAIN_ABOVE = 0.5;
/** on a slow link, no plain probes once in place leaves out this share of the pages */
const SLOW_LINK_NO_PLAIN_ABOVE = 0.1;
/** in place "saves nothing" below this share of pages */
const NOTHING_SAVED = 0.01;

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
  /** share of pages the in-place path saved; pages per ms of in-place and of plain runs */
  savedShare: number | undefined;
  inPlaceRate: number | undefined;
  plainRate: number | undefined;
  #batches = 0;
  #nextSample = 0;
  #sampleGap = FIRST_SAMPLE_GAP;
  #runs = 0;
  #nextProbe = 1;
  #probeGap = FIRST_PROBE_GAP;
  #compressedRuns = 0;
  #linkRuns = 0;

  constructor(options: ChooserOptions) {
    this.options = options;
  }

  /** Whether in-place encoding is the faster, from the figures so far. */
  inPlacePays(): boolean {
    if (this.inPlaceRate === undefined || this.plainRate === undefined) return true;
    // Saving nothing, the in-place work (a zero check and a fingerprint a page) is pure cost:
    // plain. Rates are not compared here: plain runs are mostly short probes, whose per-call
    // cost made plain look half as fast as long in-place runs of the same random pages.
    if ((this.savedShare ?? 0) < NOTHING_SAVED) return false;
    return this.inPlaceRate >= this.plainRate;
  }

  /** Whether the next run goes in place (else plain): the faster one, or a probe of the other. */
  nextRunInPlace(): boolean {
    this.#runs++;
    if (this.inPlaceRate === undefined) return true;
    if ((this.savedShare ?? 0) >= NO_PLAIN_ABOVE) return true;
    // on a link slow enough for compression to matter, the pages in-place encoding leaves out
    // cost far more link time than the encoding work: a plain probe would only waste its run
    if (this.linkMBps !== undefined && !this.compressionOutOfReach() && (this.savedShare ?? 0) >= SLOW_LINK_NO_PLAIN_ABOVE) return true;
    if (this.plainRate === undefined) return false;
    const faster = this.inPlacePays();
    if (faster && (this.savedShare ?? 0) >= NO_PLAIN_ABOVE) return true;
    if (this.#runs >= this.#nextProbe) {
      this.#nextProbe = this.#runs + this.#probeGap;
      // a probe of a path measured far slower costs a run at that speed: probe it rarely
      const clearWin = Math.max(this.inPlaceRate, this.plainRate) > CLEAR_WIN * Math.min(this.inPlaceRate, this.plainRate);
      this.#probeGap = Math.min(this.#probeGap * (clearWin ? 4 : 2), MAX_PROBE_GAP);
      return !faster;
    }
    return faster;
  }

  /**
   * Plain frames have won outright: compression cannot help on this link, in-place encoding
   * leaves out next to nothing, and plain runs are at least as fast. The rest of a round then
   * goes in one call, as with encodings off (a probe at the next round's start re-checks).
   */
  settledPlain(): boolean {
    if (!this.compressionOutOfReach() || this.inPlaceRate === undefined || this.plainRate === undefined) return false;
    return (this.savedShare ?? 0) < NOTHING_SAVED && !this.inPlacePays();
  }

  /** `pages` went out encoded (in place or compressed), of which `saved` needed no body. */
  encoded(pages: number, saved: number): void {
    if (pages >= 64) this.savedShare = ewma(this.savedShare, saved / pages);
  }

  /** An in-place run sent `pages`, of which `saved` needed no body, in `ms`. */
  inPlace(pages: number, saved: number, ms: number): void {
    this.encoded(pages, saved);
    if (pages < 1024) return; // a round's tail says little
    this.inPlaceRate = ewma(this.inPlaceRate, pages / Math.max(ms, 0.01));
  }

  /** A plain run sent `pages` in `ms`. */
  plain(pages: number, ms: number): void {
    if (pages >= 1024) this.plainRate = ewma(this.plainRate, pages / Math.max(ms, 0.01));
  }

  /** Whether the next batches go through the compressor. */
  compressing(): boolean {
    if (!this.options.compress || this.compressMBps === undefined || this.ratio === undefined || this.linkMBps === undefined) return false;
    const c = this.candidates ?? 0;
    if (c < MIN_CANDIDATES || this.ratio > MAX_RATIO) return false;
    // Region bytes per second either way. Without: the link carries what in-place encoding
    // leaves. With: the link carries less, but the compressor must keep up with its share.
    const saved = this.savedShare ?? 0;
    const share = c * (1 - saved); // of all pages, those given to the compressor
    const without = this.linkMBps / Math.max(1 - saved, 0.01);
    const wire = Math.max(1 - saved - share * (1 - this.ratio), 0.01);
    const withIt = Math.min(this.compressMBps / share, this.linkMBps / wire);
    return withIt >= without * SPEED_MARGIN;
  }

  /**
   * While compressing, every LINK_PROBE_EVERY-th run goes in place instead: the link figure
   * comes only from runs big enough to fill the socket buffer many times over.
   */
  linkProbeDue(): boolean {
    this.#compressedRuns++;
    return this.#compressedRuns % LINK_PROBE_EVERY === 0;
  }

  /** Whether the link is known to be too fast for the compressor to matter (or it is off). */
  compressionOutOfReach(): boolean {
    if (!this.options.compress) return true;
    if (this.linkMBps === undefined || this.#linkRuns < 1) return false;
    return this.linkMBps > Math.max(this.compressMBps ?? 0, ASSUMED_COMPRESS_MBPS) * 2.5;
  }

  /** Whether to sample the next batch's pages before sending it uncompressed. */
  wantSample(): boolean {
    if (!this.options.compress || this.linkMBps === undefined || this.#linkRuns < 1) return false; // the link first
    // the compressor threads cannot come near a link this fast: do not even start them
    if (this.compressionOutOfReach()) return false;
    return this.#batches >= this.#nextSample;
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

  /** A run of many frames went out: `bytes` in `ms` of writing to the socket. */
  sent(bytes: number, ms: number): void {
    if (bytes < 64 * 1024) return; // too small to say anything about the link
    this.#linkRuns++;
    this.linkMBps = ewma(this.linkMBps, bytes / 1e3 / Math.max(ms, 0.01));
  }

  compressed(input: number, output: number, ms: number): void {
    if (input === 0) return;
    this.compressMBps = ewma(this.compressMBps, input / 1e3 / Math.max(ms, 0.01));
    this.ratio = ewma(this.ratio, output / input);
  }

  describe(): string {
    const f = (x: number | undefined, d = 0): string => (x === undefined ? '-' : x.toFixed(d));
    return `in-place saves ${f(this.savedShare, 2)} of pages, ${f(this.inPlaceRate)} vs plain ${f(this.plainRate)} pages/ms -> ${this.inPlacePays() ? 'in place' : 'plain'}; link ${f(this.linkMBps)} MB/s, lz4 ${f(this.compressMBps)} MB/s ratio ${f(this.ratio, 2)} candidates ${f(this.candidates, 2)} -> ${this.compressing() ? 'compress' : 'plain'}`;
  }
}
