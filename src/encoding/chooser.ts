/**
 * Decides, from what it measures while running, whether encoding and compression pay.
 *
 * - Encoding (zero, dedup, skip) needs a copy of every nonzero page and an index lookup; on a
 *   link faster than that work (loopback on 2 cores) it can cost more than the bytes it
 *   saves. Pages go in segments, each either encoded or plain; the chooser measures each
 *   mode's throughput in pages per millisecond (the work done, so both the bytes saved and
 *   the CPU spent count), runs the faster one and probes the other at growing intervals.
 * - Compression pays when the compressor outruns the link (it runs beside the sending) and
 *   recent pages shrank. Throughputs are exponentially weighted averages of measured batches;
 *   when compression is off, every PROBE_EVERY-th batch is compressed anyway to keep the
 *   compressor's figures current.
 */
const PROBE_EVERY = 16;
const SEGMENT_BATCHES = 8;
const PROBE_BATCHES = 2;
const ALPHA = 0.25;
/** compress only if the compressor is this much faster than the link */
const SPEED_MARGIN = 1.2;
/** and recent compressible pages came out at most this fraction of their size */
const MAX_RATIO = 0.9;

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
  /** pages per ms of each mode, measured over whole segments */
  encodedRate: number | undefined;
  plainRate: number | undefined;
  #yield: number | undefined;
  #batch = 0;
  /** counts encoded batches, for compression probes */
  #segment = 0;
  #segEncoded = true;
  #segStart = 0;
  #probeGap = 1;
  #nextProbe = 2;

  constructor(options: ChooserOptions) {
    this.options = options;
  }

  /**
   * Starts a segment: whether it is encoded, and how many batches it spans. The faster mode
   * runs SEGMENT_BATCHES; the slower one is probed for PROBE_BATCHES at growing intervals
   * (every 2, 4, 8, ... segments while it stays slower), so learning costs a few percent.
   */
  beginSegment(): { encoded: boolean; batches: number } {
    const o = this.options;
    if (!o.zero && !o.dedup && !o.compress) return { encoded: false, batches: Number.MAX_SAFE_INTEGER };
    this.#segment++;
    this.#segStart = performance.now();
    if (this.encodedRate === undefined) return (this.#segEncoded = true), { encoded: true, batches: PROBE_BATCHES };
    if (this.plainRate === undefined) return (this.#segEncoded = false), { encoded: false, batches: PROBE_BATCHES };
    const faster = this.encodedRate >= this.plainRate;
    if (this.#segment >= this.#nextProbe) {
      this.#probeGap *= 2;
      this.#nextProbe = this.#segment + this.#probeGap;
      this.#segEncoded = !faster;
      return { encoded: !faster, batches: PROBE_BATCHES };
    }
    this.#segEncoded = faster;
    return { encoded: faster, batches: SEGMENT_BATCHES };
  }

  /** Ends the segment begun last, after `pages` pages were sent in it. */
  endSegment(pages: number): void {
    if (pages < 64) return; // a round's tail says little
    const rate = pages / Math.max(performance.now() - this.#segStart, 0.01);
    if (this.#segEncoded) this.encodedRate = ewma(this.encodedRate, rate);
    else this.plainRate = ewma(this.plainRate, rate);
  }

  /** Whether to compress the raw pages of an encoded batch. */
  compressNext(): boolean {
    if (!this.options.compress) return false;
    if (this.compressMBps === undefined || this.ratio === undefined || this.linkMBps === undefined) return true; // measure first
    this.#batch++;
    return this.compressing() || this.#batch % PROBE_EVERY === 0;
  }

  compressing(): boolean {
    if (!this.options.compress || this.compressMBps === undefined || this.ratio === undefined || this.linkMBps === undefined) return false;
    return this.ratio <= MAX_RATIO && this.compressMBps >= this.linkMBps * SPEED_MARGIN;
  }

  /** A batch was written: `bytes` in `ms` of waiting for the socket. */
  sent(bytes: number, ms: number): void {
    if (bytes < 64 * 1024) return; // too small to say anything about the link
    this.linkMBps = ewma(this.linkMBps, bytes / 1e3 / Math.max(ms, 0.01));
  }

  compressed(input: number, output: number, ms: number): void {
    if (input === 0) return;
    this.compressMBps = ewma(this.compressMBps, input / 1e3 / Math.max(ms, 0.01));
    this.ratio = ewma(this.ratio, output / input);
  }

  /** An encoded batch of `rawBytes` of pages went out as `wireBytes` (the saving, for reports). */
  encoded(rawBytes: number, wireBytes: number): void {
    if (rawBytes === 0) return;
    this.#yield = ewma(this.#yield, 1 - wireBytes / rawBytes);
  }
}
