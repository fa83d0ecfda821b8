/**
 * What crosses between a FramedConnection (connection.ts) and the native Wire (native/wire/):
 * the frames a read returns, with what a page sink applied before them; the page sink; and
 * sendPages' request and flags; each checked and shaped here for the native call.
 */
import { LivemigError } from '../errors.js';
import type { NativeSendPages, NativeWire } from '../native.js';
import type { Region } from '../region/region.js';
import type { Frame } from './frame.js';
import { MAX_BATCH_PAGES, MAX_FRAME_TYPE, MAX_PAYLOAD } from './format.js';

export type { SendCounts } from '../native.js';

/** sendPages flags: PAGES_ENC frames with, in place, zero detection and/or dedup. */
export const SEND_ZERO = 1;
export const SEND_DEDUP = 2;

/**
 * One sendPages call: the region, the pages (ascending within a round) and the round, the
 * negotiated version, pages per frame, and the table each page's hash is stored in as it goes
 * (the commitment digest is over it). PAGES_ENC needs `dedup` (the index of what the receiver
 * holds) and `flags`; with `now`, up to SEND_NOW_PAGES pages with nothing queued ahead go from
 * the calling thread.
 */
export type SendPagesRequest = Omit<NativeSendPages, 'region' | 'flags' | 'now'> & {
  region: Region;
  flags?: number;
  now?: boolean;
};

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

/** frames up to this size may be written from the calling thread (FramedConnection.send) */
export const SEND_NOW_MAX = 64 * 1024;
/** pages a sendPages call may send from the calling thread (4 MiB: well under a millisecond) */
export const SEND_NOW_PAGES = 1024;

/** A sendPages request, checked, as the native Wire takes it; `now`: sent from the calling thread. */
export function nativeSendPages(req: SendPagesRequest, now: boolean): NativeSendPages {
  const { region, pages, round, version, batchPages, hashes, dedup, flags = 0 } = req;
  if (batchPages < 1 || batchPages > MAX_BATCH_PAGES)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `batchPages must be within 1..${MAX_BATCH_PAGES}`, { phase: 'precopy' });
  if (flags !== 0 && dedup === undefined) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'encoded frames need the dedup index', { phase: 'precopy' });
  if (hashes.length < region.pageCount)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `the hash table has ${hashes.length} entries for ${region.pageCount} pages`, { phase: 'precopy' });
  return { region: region.nativeHandle, pages, round, version, batchPages, hashes, flags, now, ...(dedup ? { dedup } : {}) };
}

/** A native read's limits (each frame type's payload limit, protocol/limits.ts) and page sink. */
export function nativeRead(limits: Uint32Array, sink?: PageSink): Parameters<NativeWire['read']>[0] {
  return {
    maxPayload: MAX_PAYLOAD,
    maxType: MAX_FRAME_TYPE,
    limits,
    ...(sink
      ? {
          sink: {
            region: sink.region.nativeHandle,
            hashes: sink.hashes,
            version: sink.version,
            maxBatchPages: MAX_BATCH_PAGES,
            encodings: sink.encodings === true,
            ...(sink.stripe ? sink.stripe : {}),
          },
        }
      : {}),
  };
}

/** The parts of a frame after its first `sent` bytes. */
export function remainder(parts: Buffer[], sent: number): Buffer[] {
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
