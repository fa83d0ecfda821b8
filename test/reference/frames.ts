/**
 * The reference implementation of the frame layer, for tests: a byte-stream parser written as
 * an explicit two-state machine (header, payload) that never trusts a length before checking
 * it, and the PAGES / PAGES_ENC layouts built and read in plain TypeScript. The engine itself
 * parses and builds page frames natively (native/wire/); tests check both against this.
 */
import { ProtocolError } from '../../src/protocol/errors.js';
import { encodeFrame, encodeHeader, type Frame } from '../../src/protocol/frame.js';
import { FrameType, HEADER_BYTES, MAGIC, MAX_BATCH_PAGES, MAX_PAYLOAD, PAGES_PREFIX_BYTES, PageEncoding } from '../../src/protocol/format.js';

const KNOWN_TYPES = new Set<number>(Object.values(FrameType).filter((v): v is number => typeof v === 'number'));

interface Header {
  version: number;
  type: FrameType;
  flags: number;
  length: number;
}

/** Checks a header read from the peer; throws ProtocolError for anything not allowed. */
export function decodeHeader(b: Buffer, offset = 0): Header {
  const magic = b.readUInt16LE(offset);
  if (magic !== MAGIC)
    throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `bad frame magic 0x${magic.toString(16)} (expected 0x${MAGIC.toString(16)}): not a livemig stream`);
  const version = b.readUInt8(offset + 2);
  const type = b.readUInt8(offset + 3);
  const flags = b.readUInt16LE(offset + 4);
  const reserved = b.readUInt16LE(offset + 6);
  const length = b.readUInt32LE(offset + 8);
  if (!KNOWN_TYPES.has(type)) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unknown frame type ${type}`);
  if (reserved !== 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `reserved header field is ${reserved}, not 0`);
  if (length > MAX_PAYLOAD)
    throw new ProtocolError('ERR_LIVEMIG_FRAME_TOO_LARGE', `frame of type ${FrameType[type]} announces ${length} payload bytes (max ${MAX_PAYLOAD})`);
  return { version, type: type as FrameType, flags, length };
}

/**
 * Turns a byte stream into frames: an explicit two-state machine (header, payload) that waits
 * for enough bytes and never trusts a length before checking it.
 */
export class FrameParser {
  #state: 'header' | 'payload' = 'header';
  #head = Buffer.allocUnsafe(HEADER_BYTES);
  #headFill = 0;
  #header: Header | undefined;
  #payload: Buffer = Buffer.alloc(0);
  #payloadFill = 0;
  readonly #allocate: (length: number) => Buffer;

  /**
   * `allocate` provides payload buffers; a pool there saves the page faults of a fresh
   * megabyte per frame (expensive on VM hosts).
   */
  constructor(allocate: (length: number) => Buffer = (n) => Buffer.allocUnsafe(n)) {
    this.#allocate = allocate;
  }

  /** Bytes of an incomplete frame held back (0 between frames). */
  get pending(): number {
    return this.#state === 'header' ? this.#headFill : HEADER_BYTES + this.#payloadFill;
  }

  push(chunk: Buffer, onFrame: (f: Frame) => void): void {
    let pos = 0;
    while (pos < chunk.length) {
      if (this.#state === 'header') {
        const n = Math.min(HEADER_BYTES - this.#headFill, chunk.length - pos);
        chunk.copy(this.#head, this.#headFill, pos, pos + n);
        this.#headFill += n;
        pos += n;
        if (this.#headFill < HEADER_BYTES) return;
        this.#header = decodeHeader(this.#head);
        this.#headFill = 0;
        this.#payload = this.#allocate(this.#header.length);
        this.#payloadFill = 0;
        this.#state = 'payload';
      }
      const n = Math.min(this.#payload.length - this.#payloadFill, chunk.length - pos);
      chunk.copy(this.#payload, this.#payloadFill, pos, pos + n);
      this.#payloadFill += n;
      pos += n;
      if (this.#payloadFill < this.#payload.length) return;
      const h = this.#header!;
      this.#state = 'header';
      onFrame({ version: h.version, type: h.type, flags: h.flags, payload: this.#payload });
    }
  }
}

/**
 * PAGES layout (payload): u32 round, u32 count, count × u32 page index, count × pageSize bytes.
 * pagesFrameBytes() sizes a buffer; writePagesPrefix() fills header, round, count and indices;
 * the caller (native gather) fills the page data at dataOffset.
 */
export function pagesFrameBytes(count: number, pageSize: number): number {
  return HEADER_BYTES + PAGES_PREFIX_BYTES + count * 4 + count * pageSize;
}
export function pagesDataOffset(count: number): number {
  return HEADER_BYTES + PAGES_PREFIX_BYTES + count * 4;
}
export function writePagesPrefix(out: Buffer, round: number, pages: Uint32Array, version: number): void {
  const count = pages.length;
  encodeHeader(FrameType.Pages, out.length - HEADER_BYTES, { version, into: out });
  out.writeUInt32LE(round, HEADER_BYTES);
  out.writeUInt32LE(count, HEADER_BYTES + 4);
  const idx = HEADER_BYTES + PAGES_PREFIX_BYTES;
  Buffer.from(pages.buffer, pages.byteOffset, count * 4).copy(out, idx);
}

export interface PagesBatch {
  round: number;
  indices: Uint32Array;
  data: Buffer;
}

/** Checks the batch's shape and that its indices strictly increase; they are checked against the region by the caller (native, all or nothing). */
export function decodePages(p: Buffer, pageSize: number): PagesBatch {
  if (p.length < PAGES_PREFIX_BYTES) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `PAGES payload of ${p.length} bytes is shorter than its prefix`);
  const round = p.readUInt32LE(0);
  const count = p.readUInt32LE(4);
  if (count === 0 || count > MAX_BATCH_PAGES) throw new ProtocolError('ERR_LIVEMIG_PAGE_INDEX', `PAGES count ${count} is outside 1..${MAX_BATCH_PAGES}`);
  const want = PAGES_PREFIX_BYTES + count * 4 + count * pageSize;
  if (p.length !== want) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `PAGES of ${count} pages must be ${want} bytes, got ${p.length}`);
  const idxOff = p.byteOffset + PAGES_PREFIX_BYTES;
  const indices =
    idxOff % 4 === 0
      ? new Uint32Array(p.buffer, idxOff, count)
      : new Uint32Array(p.subarray(PAGES_PREFIX_BYTES, PAGES_PREFIX_BYTES + count * 4).buffer.slice(idxOff, idxOff + count * 4));
  for (let k = 1; k < count; k++) {
    if (indices[k]! <= indices[k - 1]!)
      throw new ProtocolError('ERR_LIVEMIG_PAGE_INDEX', `page index ${indices[k]} follows ${indices[k - 1]}: a frame's indices must be strictly increasing`);
  }
  const data = p.subarray(PAGES_PREFIX_BYTES + count * 4);
  return { round, indices, data };
}

export interface EncodedPage {
  index: number;
  encoding: PageEncoding;
  /** raw: the page; zero: empty; dup: u64 content hash + u32 page holding it; lz4: lz4-napi output (u32 size + block); lz4 continuation: empty */
  body: Buffer;
}

/**
 * PAGES_ENC layout (payload): u32 round, u32 count, count × u32 index, count × u8 encoding,
 * then each page's body in order: raw pageSize bytes; zero nothing; dup u64 content hash and
 * u32 page of the receiver holding it;
 * lz4 u32 n + n bytes (u32 original size, then an LZ4 block). The reference encoder; the
 * sender's hot path builds the same bytes natively (native/wire/send_pages.cc SendEncodedBatch).
 */
export function encodePagesEnc(round: number, pages: EncodedPage[], version: number): Buffer {
  const head = Buffer.alloc(PAGES_PREFIX_BYTES + pages.length * 5);
  head.writeUInt32LE(round, 0);
  head.writeUInt32LE(pages.length, 4);
  pages.forEach((p, k) => {
    head.writeUInt32LE(p.index, 8 + 4 * k);
    head.writeUInt8(p.encoding, 8 + 4 * pages.length + k);
  });
  const bodies = pages.map((p) => {
    if (p.encoding !== PageEncoding.Lz4) return p.body;
    const n = Buffer.alloc(4);
    n.writeUInt32LE(p.body.length);
    return Buffer.concat([n, p.body]);
  });
  return encodeFrame(FrameType.PagesEnc, Buffer.concat([head, ...bodies]), version);
}
