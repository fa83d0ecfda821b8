/**
 * Frame layer of the wire protocol (spec: docs/PROTOCOL.md). Every frame is a fixed 12-byte
 * little-endian header followed by `length` payload bytes:
 *
 *   offset size field
 *   0      2    magic    0x4D4C ("LM")
 *   2      1    version  protocol version of this frame
 *   3      1    type     FrameType; 0 is reserved as invalid
 *   4      2    flags    per-type; 0 unless the type defines flags
 *   6      2    reserved must be 0
 *   8      4    length   payload bytes, at most MAX_PAYLOAD
 */
import { ProtocolError } from './errors.js';

export const MAGIC = 0x4d4c;
export const HEADER_BYTES = 12;
/** Current protocol version, and the oldest one still accepted from a peer. */
export const PROTOCOL_VERSION = 2;
export const MIN_PROTOCOL_VERSION = 1;
/** Largest payload accepted: a 64 MiB device state, or a page batch (well under). */
export const MAX_PAYLOAD = 64 * 1024 * 1024;

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
  /** binary, on the priority connection only; parsed natively (native/postcopy.cc) */
  PageRequest = 18,
  PostcopyComplete = 19,
  Attached = 20,
}

const KNOWN_TYPES = new Set<number>(Object.values(FrameType).filter((v): v is number => typeof v === 'number'));

export interface Frame {
  version: number;
  type: FrameType;
  flags: number;
  payload: Buffer;
}

export function encodeHeader(type: FrameType, payloadLength: number, version = PROTOCOL_VERSION, flags = 0, into?: Buffer): Buffer {
  if (payloadLength > MAX_PAYLOAD) throw new ProtocolError('ERR_LIVEMIG_FRAME_TOO_LARGE', `refusing to send a ${payloadLength}-byte frame (max ${MAX_PAYLOAD})`);
  const h = into ?? Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt16LE(MAGIC, 0);
  h.writeUInt8(version, 2);
  h.writeUInt8(type, 3);
  h.writeUInt16LE(flags, 4);
  h.writeUInt16LE(0, 6);
  h.writeUInt32LE(payloadLength, 8);
  return h;
}

export function encodeFrame(type: FrameType, payload: Buffer, version = PROTOCOL_VERSION, flags = 0): Buffer {
  const out = Buffer.allocUnsafe(HEADER_BYTES + payload.length);
  encodeHeader(type, payload.length, version, flags, out);
  payload.copy(out, HEADER_BYTES);
  return out;
}

interface Header {
  version: number;
  type: FrameType;
  flags: number;
  length: number;
}

/** Checks a header read from the peer; throws ProtocolError for anything not allowed. */
export function decodeHeader(b: Buffer, offset = 0): Header {
  const magic = b.readUInt16LE(offset);
  if (magic !== MAGIC) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `bad frame magic 0x${magic.toString(16)} (expected 0x${MAGIC.toString(16)}): not a livemig stream`);
  const version = b.readUInt8(offset + 2);
  const type = b.readUInt8(offset + 3);
  const flags = b.readUInt16LE(offset + 4);
  const reserved = b.readUInt16LE(offset + 6);
  const length = b.readUInt32LE(offset + 8);
  if (!KNOWN_TYPES.has(type)) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unknown frame type ${type}`);
  if (reserved !== 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `reserved header field is ${reserved}, not 0`);
  if (length > MAX_PAYLOAD) throw new ProtocolError('ERR_LIVEMIG_FRAME_TOO_LARGE', `frame of type ${FrameType[type]} announces ${length} payload bytes (max ${MAX_PAYLOAD})`);
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
