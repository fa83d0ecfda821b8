/**
 * What the page encoder counts: pages per encoding and the bytes LZ4 took in and gave out. A
 * module of its own so that the trace catalogue (src/trace-events.ts) can name it without
 * importing the encoder, which imports the catalogue.
 */
export interface EncodingStats {
  zero_pages: number;
  dup_pages: number;
  lz4_pages: number;
  raw_pages: number;
  /** pages the receiver already held in place (a kept image); zero pages it held as zero count as zero_pages */
  skipped_pages: number;
  /** bytes of pages that went out compressed, before and after */
  lz4_in: number;
  lz4_out: number;
}
