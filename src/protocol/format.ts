/**
 * The wire format's one home in TypeScript (spec: docs/PROTOCOL.md; native twin:
 * native/wire/format.h, and test/format.test.ts checks that the two agree). Every frame is a
 * fixed 12-byte little-endian header followed by `length` payload bytes:
 *
 *   offset size field
 *   0      2    magic    0x4D4C ("LM")
 *   2      1    version  protocol version of this frame
 *   3      1    type     FrameType; 0 is reserved as invalid
 *   4      2    flags    per-type; 0 unless the type defines flags (none does yet)
 *   6      2    reserved must be 0
 *   8      4    length   payload bytes, at most MAX_PAYLOAD
 */

export const MAGIC = 0x4d4c;
export const HEADER_BYTES = 12;
/** Current protocol version, and the oldest one still accepted from a peer. */
export const PROTOCOL_VERSION = 3;
export const MIN_PROTOCOL_VERSION = 1;
/**
 * The oldest version a source speaks: the first in which the destination proves it holds the
 * image (DIGEST) before the source commits. A destination cannot negotiate the proof away: a
 * source refuses an ACCEPT of an older version, or one without `commit-activate` (docs/PROTOCOL.md,
 * "The commit proof"). A receiver still takes older sources on loopback without credentials.
 */
export const MIN_SOURCE_VERSION = 3;
/** Largest payload accepted: a 64 MiB device state, or a page batch (well under). */
export const MAX_PAYLOAD = 64 * 1024 * 1024;
/** Header flags: none but DEVICE_STATE's; every other frame carries 0. */
export const FLAGS_NONE = 0;
/**
 * DEVICE_STATE, version 3: the source commits after this frame, so the destination sends its
 * own digest of what it holds (DIGEST) for the source to compare before it commits.
 */
export const FLAG_PROVE = 1;

/**
 * The page size of the wire and of every region: PAGES bodies are this long. The addon refuses
 * to load on a host whose page size differs (native/addon.cc), so there is one truth.
 */
export const PAGE_SIZE = 4096;
/** Most pages one PAGES or PAGES_ENC frame may carry (16 MiB of 4 KiB pages). */
export const MAX_BATCH_PAGES = 4096;
/** PAGES and PAGES_ENC payloads start with u32 round, u32 count. */
export const PAGES_PREFIX_BYTES = 8;
/** A dup page's body: u64 content hash, u32 page of the receiver holding it. */
export const DUP_BODY_BYTES = 12;
/** Pages one LZ4 block may cover (an Lz4 page and up to three Lz4Cont pages after it). */
export const MAX_LZ4_GROUP = 4;
/**
 * Parallel channels (CAP_CHANNELS): page p travels on channel floor(p / STRIPE_PAGES) mod N,
 * always, so every copy of a page and every page a dup names go through one TCP stream.
 */
export const STRIPE_PAGES = 256;
/** Channels one migration may use, the first connection included. */
export const MAX_CHANNELS = 16;

export enum FrameType {
  Hello = 1,
  Accept = 2,
  Error = 3,
  Pages = 4,
  RoundEnd = 5,
  DeviceState = 6,
  Commit = 7,
  CommitAck = 8,
  Activate = 9,
  Activated = 10,
  Abort = 11,
  RoundAck = 12,
  /** version 2: a batch with per-page encodings (raw, zero, dup, lz4) */
  PagesEnc = 13,
  /** version 2: the page hashes of an image the receiver already holds */
  ImageHashes = 14,
  /** version 2, capability `postcopy`: the switch; the destination resumes the guest at once */
  Postcopy = 15,
  PostcopyRunning = 16,
  /** version 2: a new connection joining a post-copy session (priority, or after a break) */
  Attach = 17,
  /** binary, on the priority connection only: u32 count, count × u32 page */
  PageRequest = 18,
  /** binary, D->S: u64 digest of the page hashes, u32 page count */
  PostcopyComplete = 19,
  Attached = 20,
  /** version 3, R->S: the destination's own digest of what it holds, asked for by DEVICE_STATE's FLAG_PROVE */
  Digest = 21,
  /** capability `resolve`, S->R on a new connection: what became of a session whose commitment went unconfirmed */
  Resolve = 22,
  /** R->S: the answer; `not-activated` fences the session for good */
  Resolved = 23,
}

export const MAX_FRAME_TYPE = Math.max(...Object.values(FrameType).filter((v): v is number => typeof v === 'number'));

/** Per-page encodings of a PAGES_ENC frame. */
export enum PageEncoding {
  Raw = 0,
  Zero = 1,
  Dup = 2,
  /** an LZ4 block of this page, or of this page and the Lz4Cont pages right after it (at most 4 in all) */
  Lz4 = 3,
  // 4 is not used (removed before release; refused)
  /** part of the block of the Lz4 page before it; no body */
  Lz4Cont = 5,
}

/** Capability names (HELLO from the sender, ACCEPT from the receiver; version 2 and later). */
export const CAP_ENCODINGS = 'encodings';
/** ACCEPT: an IMAGE_HASHES frame follows; without it the receiver's region starts all zero. */
export const CAP_IMAGE_HASHES = 'image-hashes';
/**
 * HELLO/ACCEPT: COMMIT may carry `activate: true`: the destination checks the digest and, if it
 * matches, activates at once and answers ACTIVATED (one round trip less inside the downtime);
 * if not, it answers ERROR and the source resumes. Sending that COMMIT is the point of commitment.
 */
export const CAP_COMMIT_ACTIVATE = 'commit-activate';
/**
 * HELLO/ACCEPT: the sender may switch to post-copy (POSTCOPY); ACCEPT then carries a session
 * token, and further connections join with ATTACH naming it.
 */
export const CAP_POSTCOPY = 'postcopy';
/** HELLO: the sender will switch to post-copy (mode postcopy or hybrid): the destination need not map the guest's memory ahead */
export const CAP_POSTCOPY_PLANNED = 'postcopy-planned';
/**
 * HELLO/ACCEPT: a commitment whose confirmation was lost can be resolved. ACCEPT then carries a
 * session token; a new connection may send RESOLVE naming it, and the destination answers
 * RESOLVED with what it did: `activated`, or `not-activated`, after which it never activates
 * that session (it is fenced).
 */
export const CAP_RESOLVE = 'resolve';
/**
 * HELLO/ACCEPT: a same-host upgrade. HELLO's `local` names a unix socket where the source
 * offers the guest's memfds, a token and the host's boot id; the destination takes the memory
 * from there before ACCEPT (no page is sent), and refuses from another host.
 */
export const CAP_LOCAL = 'local';
/**
 * HELLO/ACCEPT (version 3): parallel channels. HELLO's `channels` asks for N connections in
 * all, ACCEPT's grants M (1..N) and a session token; the source opens M-1 more, each starting
 * with ATTACH {session, role: "channel", channel: k}, and sends each page on its stripe's
 * channel (STRIPE_PAGES). Each extra channel ends with ROUND_END {last: true}.
 */
export const CAP_CHANNELS = 'channels';
/**
 * HELLO/ACCEPT: the receiver's region starts as holes that read as zero (no image), and each
 * of its page hashes starts as the zero page's; the sender then sends no page its guest's
 * memory holds none for (a hole of its memfd, SEEK_DATA), and counts those pages as zero.
 * HELLO's optional `resident` says where the guest's data was when it was sent, so that a
 * receiver allocates only those pages ahead (a hint: a page outside it may still come).
 */
export const CAP_HOLES = 'holes';
/**
 * HELLO/ACCEPT: the guest's disks move with its memory. HELLO's `disks` names them and their
 * sizes; they follow the memory in the page space (regionBytes counts them, `regions` does not)
 * and go as pages. A receiver that does not answer it is not sent the migration.
 */
export const CAP_DISKS = 'disks';
/** at most this many [first, end) runs in HELLO's `resident` (8 bytes each); more are merged across their smallest gaps */
export const MAX_RESIDENT_RUNS = 4096;
/**
 * at most this many bytes of bitmap in HELLO's `residentMap` (a u32 chunk size in pages, then a
 * bit per chunk): data in more runs than `resident` holds (a 16 GiB guest with 1 GiB written
 * in 64 KiB pieces has ~15000) is told at 64 KiB chunks up to 16 GiB, coarser above
 */
export const MAX_RESIDENT_MAP_BYTES = 32 * 1024;
/** a residentMap chunk is a power of two of at most this many pages */
export const MAX_RESIDENT_CHUNK_PAGES = 1 << 20;
