/**
 * Decides whether compression pays. Nothing else is chosen, on purpose.
 *
 * Zero pages and dups are found in place on every page whenever they are enabled: the zero
 * check stops at the first nonzero word (a random page costs one cache line the send reads
 * anyway), and a page is hashed before its send only when its fingerprint matches indexed
 * content. An earlier chooser timed in-place runs against plain ones and ran the faster: on
 * loopback the two differ by less than their scatter, so the same workload went out as 0.62 of
 * its size in one run and 0.99 in the next (plain frames carry zero pages as bytes). Not timing
 * them is what makes the outcome the same on every run.
 *
 * Compression needs a copy of every page and compressor threads that keep up (lz4-napi, 100 to
 * 250 MB/s a thread here), so it pays only on a link slower than that. What is measured: the
 * link, as the bytes all channels took over the wall time of their sends, cumulative from the
 * first page (`link()`, given by the caller), not a moving average of short runs: those first
 * runs land in the busiest moments of the guest and the receiver, and a loopback link once
 * measured slow there and compressed (456 ms in one run of the default demo, 1748 ms in the
 * next). The rule: once LINK_WINDOW bytes went, a link faster than FAST_LINK_MBPS is fast and
 * compression is off for the rest of the migration, never weighed again. Why that is stable:
 * the links a migration meets sit far from the threshold (loopback here 1100 to 2800 MB/s,
 * 1 Gbit/s 117 MB/s), a factor of 3 either side, against a run-to-run scatter of 10 to 30%.
 * Below it, compression is weighed from its own figures: the compressor's throughput and ratio
 * on samples taken off to the side, and the share of pages that look compressible.
 */
const ALPHA = 0.25;
/** bytes sent before the link is judged */
export const LINK_WINDOW = 64 << 20;
/** a link faster than this (MB/s) is out of the compressor's reach: three times what two lz4 threads do here */
export const FAST_LINK_MBPS = 600;
/** compress only if that moves region bytes this much faster than not compressing */
const SPEED_MARGIN = 1.1;
/** and recent compressible pages came out at most this fraction of their size */
const MAX_RATIO = 0.9;
/** and at least this share of nonzero pages looked compressible */
const MIN_CANDIDATES = 0.05;
/** batches between samples: starts here, doubles while the answer stays "do not compress" */
const FIRST_SAMPLE_GAP = 8;
const MAX_SAMPLE_GAP = 256;

const ewma = (old: number | undefined, x: number): number => (old === undefined ? x : old + ALPHA * (x - old));

export interface ChooserOptions {
  zero: boolean;
  dedup: boolean;
  compress: boolean;
}

/** The link as measured so far: bytes all channels took, over the wall time of their sends. */
export interface LinkFigure {
  bytes: number;
  ms: number;
  /** channels sharing it: each has a compressor of its own */
  channels: number;
}

export class Chooser {
  readonly options: ChooserOptions;
  compressMBps: number | undefined;
  ratio: number | undefined;
  /** share of sampled nonzero pages that looked compressible */
  candidates: number | undefined;
  /** share of pages that needed no body (zero, dup, held) */
  savedShare: number | undefined;
  readonly #link: () => LinkFigure | undefined;
  /** the link was judged fast: settled for the migration */
  #fast = false;
  #batches = 0;
  #nextSample = 0;
  #sampleGap = FIRST_SAMPLE_GAP;

  constructor(options: ChooserOptions, link: () => LinkFigure | undefined = () => undefined) {
    this.options = options;
    this.#link = link;
  }

  /** This channel's share of the link, MB/s, once LINK_WINDOW bytes went; undefined before. */
  linkMBps(): number | undefined {
    const l = this.#link();
    if (!l || l.bytes < LINK_WINDOW || l.ms <= 0) return undefined;
    return l.bytes / 1e3 / l.ms / Math.max(1, l.channels);
  }

  /** Whether compression is off for good: disabled, or the link was judged too fast for it. */
  compressionOutOfReach(): boolean {
    if (!this.options.compress || this.#fast) return true;
    const l = this.#link();
    if (!l || l.bytes < LINK_WINDOW || l.ms <= 0) return false;
    this.#fast = l.bytes / 1e3 / l.ms > FAST_LINK_MBPS;
    return this.#fast;
  }

  /** Whether the next batches go through the compressor. */
  compressing(): boolean {
    if (this.compressionOutOfReach()) return false;
    const link = this.linkMBps();
    if (this.compressMBps === undefined || this.ratio === undefined || link === undefined) return false;
    const c = this.candidates ?? 0;
    if (c < MIN_CANDIDATES || this.ratio > MAX_RATIO) return false;
    // Region bytes per second either way. Without: the link carries what in-place encoding
    // leaves. With: the link carries less, but the compressor must keep up with its share.
    const saved = this.savedShare ?? 0;
    const share = c * (1 - saved); // of all pages, those given to the compressor
    const without = link / Math.max(1 - saved, 0.01);
    const wire = Math.max(1 - saved - share * (1 - this.ratio), 0.01);
    const withIt = Math.min(this.compressMBps / share, link / wire);
    return withIt >= without * SPEED_MARGIN;
  }

  /** `pages` went out encoded (in place or compressed), of which `saved` needed no body. */
  encoded(pages: number, saved: number): void {
    if (pages >= 64) this.savedShare = ewma(this.savedShare, saved / pages);
  }

  /** Whether to sample the next batch's pages before sending it uncompressed. */
  wantSample(): boolean {
    // the link first: a fast one never starts the compressor threads at all
    if (this.compressionOutOfReach() || this.linkMBps() === undefined) return false;
    return this.#batches >= this.#nextSample;
  }

  /** `n` batches went out. */
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

  compressed(input: number, output: number, ms: number): void {
    if (input === 0) return;
    this.compressMBps = ewma(this.compressMBps, input / 1e3 / Math.max(ms, 0.01));
    this.ratio = ewma(this.ratio, output / input);
  }

  describe(): string {
    const f = (x: number | undefined, d = 0): string => (x === undefined ? '-' : x.toFixed(d));
    return (
      `saves ${f(this.savedShare, 2)} of pages in place; link ${f(this.linkMBps())} MB/s a ` +
      `channel${this.#fast ? ' (fast: no compression)' : ''}, lz4 ${f(this.compressMBps)} MB/s ratio ${f(this.ratio, 2)} candidates ` +
      `${f(this.candidates, 2)} -> ${this.compressing() ? 'compress' : 'in place'}`
    );
  }
}
