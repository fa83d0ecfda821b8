/**
 * Message payloads, one encode/decode pair per frame type. Control messages are msgpack maps;
 * PAGES is a binary batch. Every decoder treats its input as hostile and throws ProtocolError.
 */
import { pack, unpack } from 'msgpackr';
import { addon } from '../native.js';
import { ProtocolError } from './errors.js';
import { FrameType, HEADER_BYTES, MAX_PAYLOAD, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, encodeFrame, encodeHeader } from './frame.js';

/** Most pages one PAGES frame may carry (16 MiB of 4 KiB pages). */
export const MAX_BATCH_PAGES = 4096;
export const PAGES_PREFIX_BYTES = 8;

export interface Hello {
  /** versions the sender speaks, [oldest, newest] */
  versions: [number, number];
  regionBytes: number;
  pageSize: number;
  /** authentication: reserved for a later version (pre-shared key, TLS); must be null now */
  auth: null;
  capabilities: string[];
}
export interface Accept {
  version: number;
  capabilities: string[];
  /** with CAP_POSTCOPY: the token an ATTACH must name */
  session?: string;
}
export interface ErrorMessage {
  code: string;
  message: string;
  phase: string;
}
export interface RoundEnd {
  round: number;
  pages: number;
}
export interface Commit {
  digest: bigint;
  pageCount: number;
  /** with CAP_COMMIT_ACTIVATE: activate at once if the digest matches (no COMMIT_ACK, no ACTIVATE) */
  activate?: boolean;
}
export interface CommitAck {
  digest: bigint;
}
export interface Activated {
  activateMs: number;
}
export interface Abort {
  reason: string;
}

function bad(what: string): ProtocolError {
  return new ProtocolError('ERR_LIVEMIG_PROTOCOL', what);
}

function decodeMap(payload: Buffer, type: FrameType): Record<string, unknown> {
  let v: unknown;
  try {
    v = unpack(payload);
  } catch (e) {
    throw bad(`${FrameType[type]} payload is not valid msgpack: ${(e as Error).message}`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v) || Buffer.isBuffer(v)) throw bad(`${FrameType[type]} payload is not a map`);
  return v as Record<string, unknown>;
}

const isCount = (v: unknown, max = Number.MAX_SAFE_INTEGER): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 && v <= max;
const isString = (v: unknown, max = 4096): v is string => typeof v === 'string' && v.length <= max;
const isU64 = (v: unknown): v is bigint => typeof v === 'bigint' && v >= 0n && v < 1n << 64n;

function control(type: FrameType, body: object, version: number): Buffer {
  return encodeFrame(type, pack(body) as Buffer, version);
}

export const encodeHello = (h: Hello): Buffer => control(FrameType.Hello, h, PROTOCOL_VERSION);
export function decodeHello(p: Buffer): Hello {
  const m = decodeMap(p, FrameType.Hello);
  const v = m.versions;
  if (!Array.isArray(v) || v.length !== 2 || !isCount(v[0], 255) || !isCount(v[1], 255) || v[0] > v[1]) throw bad('HELLO versions must be [oldest, newest]');
  if (!isCount(m.regionBytes) || m.regionBytes === 0) throw bad('HELLO regionBytes must be a positive integer');
  if (!isCount(m.pageSize, 1 << 30) || m.pageSize === 0) throw bad('HELLO pageSize must be a positive integer');
  if (m.auth !== null) throw bad('HELLO auth must be null in protocol version 1 (authentication is not negotiated yet)');
  if (!Array.isArray(m.capabilities) || m.capabilities.length > 64 || !m.capabilities.every((c) => isString(c, 64))) throw bad('HELLO capabilities must be a list of short strings');
  return { versions: [v[0], v[1]], regionBytes: m.regionBytes, pageSize: m.pageSize, auth: null, capabilities: m.capabilities as string[] };
}

/** The version both sides speak: the newest in both ranges, or undefined. */
export function negotiateVersion(peer: [number, number]): number | undefined {
  const v = Math.min(peer[1], PROTOCOL_VERSION);
  return v >= Math.max(peer[0], MIN_PROTOCOL_VERSION) ? v : undefined;
}

export const encodeAccept = (a: Accept, version: number): Buffer => control(FrameType.Accept, a, version);
export function decodeAccept(p: Buffer): Accept {
  const m = decodeMap(p, FrameType.Accept);
  if (!isCount(m.version, 255)) throw bad('ACCEPT version must be an integer');
  if (!Array.isArray(m.capabilities) || !m.capabilities.every((c) => isString(c, 64))) throw bad('ACCEPT capabilities must be a list of strings');
  if (m.session !== undefined && !(isString(m.session, 64) && /^[0-9a-f]{32}$/.test(m.session))) throw bad('ACCEPT session must be 32 hex digits');
  return { version: m.version, capabilities: m.capabilities as string[], ...(m.session !== undefined ? { session: m.session } : {}) };
}

export const encodeError = (e: ErrorMessage, version: number): Buffer => control(FrameType.Error, e, version);
export function decodeError(p: Buffer): ErrorMessage {
  const m = decodeMap(p, FrameType.Error);
  if (!isString(m.code, 64) || !/^ERR_LIVEMIG_[A-Z_]+$/.test(m.code)) throw bad('ERROR code must be an ERR_LIVEMIG_* string');
  if (!isString(m.message) || !isString(m.phase, 64)) throw bad('ERROR message and phase must be strings');
  return { code: m.code, message: m.message, phase: m.phase };
}

export const encodeRoundEnd = (r: RoundEnd, version: number): Buffer => control(FrameType.RoundEnd, r, version);
export function decodeRoundEnd(p: Buffer): RoundEnd {
  const m = decodeMap(p, FrameType.RoundEnd);
  if (!isCount(m.round, 1 << 20) || !isCount(m.pages)) throw bad('ROUND_END round and pages must be counts');
  return { round: m.round, pages: m.pages };
}

/** ROUND_ACK (R->S): every page of rounds up to `round` is applied. Same body as ROUND_END. */
export const encodeRoundAck = (r: RoundEnd, version: number): Buffer => control(FrameType.RoundAck, r, version);
export function decodeRoundAck(p: Buffer): RoundEnd {
  return decodeRoundEnd(p);
}

export const encodeCommit = (c: Commit, version: number): Buffer => control(FrameType.Commit, c, version);
export function decodeCommit(p: Buffer): Commit {
  const m = decodeMap(p, FrameType.Commit);
  if (!isU64(m.digest) || !isCount(m.pageCount)) throw bad('COMMIT needs a u64 digest and a page count');
  if (m.activate !== undefined && typeof m.activate !== 'boolean') throw bad('COMMIT activate must be a boolean');
  return { digest: m.digest, pageCount: m.pageCount, ...(m.activate === true ? { activate: true } : {}) };
}

export const encodeCommitAck = (c: CommitAck, version: number): Buffer => control(FrameType.CommitAck, c, version);
export function decodeCommitAck(p: Buffer): CommitAck {
  const m = decodeMap(p, FrameType.CommitAck);
  if (!isU64(m.digest)) throw bad('COMMIT_ACK needs a u64 digest');
  return { digest: m.digest };
}

export const encodeActivate = (version: number): Buffer => control(FrameType.Activate, {}, version);
export const encodeActivated = (a: Activated, version: number): Buffer => control(FrameType.Activated, a, version);
export function decodeActivated(p: Buffer): Activated {
  const m = decodeMap(p, FrameType.Activated);
  if (typeof m.activateMs !== 'number' || !(m.activateMs >= 0)) throw bad('ACTIVATED activateMs must be a non-negative number');
  return { activateMs: m.activateMs };
}

export const encodeAbort = (a: Abort, version: number): Buffer => control(FrameType.Abort, a, version);
export function decodeAbort(p: Buffer): Abort {
  const m = decodeMap(p, FrameType.Abort);
  if (!isString(m.reason)) throw bad('ABORT reason must be a string');
  return { reason: m.reason };
}

export function encodeDeviceState(state: Uint8Array, version: number): Buffer {
  if (state.length > MAX_PAYLOAD) throw new ProtocolError('ERR_LIVEMIG_FRAME_TOO_LARGE', `device state of ${state.length} bytes exceeds ${MAX_PAYLOAD}`);
  return encodeFrame(FrameType.DeviceState, Buffer.from(state.buffer, state.byteOffset, state.byteLength), version);
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
export function writePagesPrefix(out: Buffer, round: number, pages: Uint32Array, pageSize: number, version: number): void {
  const count = pages.length;
  encodeHeader(FrameType.Pages, out.length - HEADER_BYTES, version, 0, out);
  out.writeUInt32LE(round, HEADER_BYTES);
  out.writeUInt32LE(count, HEADER_BYTES + 4);
  const idx = HEADER_BYTES + PAGES_PREFIX_BYTES;
  Buffer.from(pages.buffer, pages.byteOffset, count * 4).copy(out, idx);
  void pageSize;
}

export interface PagesBatch {
  round: number;
  indices: Uint32Array;
  data: Buffer;
}

/** Checks the batch's shape; page indices are checked against the region by the caller (native, all or nothing). */
export function decodePages(p: Buffer, pageSize: number): PagesBatch {
  if (p.length < PAGES_PREFIX_BYTES) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `PAGES payload of ${p.length} bytes is shorter than its prefix`);
  const round = p.readUInt32LE(0);
  const count = p.readUInt32LE(4);
  if (count === 0 || count > MAX_BATCH_PAGES) throw new ProtocolError('ERR_LIVEMIG_PAGE_INDEX', `PAGES count ${count} is outside 1..${MAX_BATCH_PAGES}`);
  const want = PAGES_PREFIX_BYTES + count * 4 + count * pageSize;
  if (p.length !== want) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `PAGES of ${count} pages must be ${want} bytes, got ${p.length}`);
  const idxOff = p.byteOffset + PAGES_PREFIX_BYTES;
  const indices = idxOff % 4 === 0 ? new Uint32Array(p.buffer, idxOff, count) : new Uint32Array(p.subarray(PAGES_PREFIX_BYTES, PAGES_PREFIX_BYTES + count * 4).buffer.slice(idxOff, idxOff + count * 4));
  const data = p.subarray(PAGES_PREFIX_BYTES + count * 4);
  return { round, indices, data };
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

export enum PageEncoding {
  Raw = 0,
  Zero = 1,
  Dup = 2,
  /** an LZ4 block of this page, or of this page and the Lz4Cont pages right after it (at most 4 in all) */
  Lz4 = 3,
  /** 4 is not used (removed before release; refused) */
  /** part of the block of the Lz4 page before it; no body */
  Lz4Cont = 5,
}

/** IMAGE_HASHES payload: pageCount × u64 little-endian page hashes, page order. */
export function encodeImageHashes(hashes: BigUint64Array, version: number): Buffer {
  return encodeFrame(FrameType.ImageHashes, Buffer.from(hashes.buffer, hashes.byteOffset, hashes.byteLength), version);
}
export function decodeImageHashes(p: Buffer, pageCount: number): BigUint64Array {
  if (p.length !== pageCount * 8) throw bad(`IMAGE_HASHES of ${p.length} bytes, expected ${pageCount * 8} for ${pageCount} pages`);
  const out = new BigUint64Array(pageCount);
  Buffer.from(out.buffer).set(p);
  return out;
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
 * sender's hot path builds the same bytes natively (native/wire.cc sendEncoded).
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

/**
 * HELLO/ACCEPT: the sender may switch to post-copy (POSTCOPY); ACCEPT then carries a session
 * token, and further connections join with ATTACH naming it.
 */
export const CAP_POSTCOPY = 'postcopy';
/** HELLO: the sender will switch to post-copy (mode postcopy or hybrid): the destination need not map the guest's memory ahead */
export const CAP_POSTCOPY_PLANNED = 'postcopy-planned';

export interface Postcopy {
  /** 1 bit per page (page p: byte p>>3, bit p&7): the destination must fetch it; others it holds */
  needed: Buffer;
}
export interface PostcopyRunning {
  activateMs: number;
}
export type AttachRole = 'push' | 'prio';
export interface Attach {
  session: string;
  role: AttachRole;
}
export interface Attached {
  /** 1 bit per page the destination holds (empty when it holds nothing yet that matters) */
  held: Buffer;
}

const bitmapBytes = (pageCount: number): number => Math.ceil(pageCount / 8);

export const encodePostcopy = (p: Postcopy, version: number): Buffer => control(FrameType.Postcopy, p, version);
export function decodePostcopy(p: Buffer, pageCount: number): Postcopy {
  const m = decodeMap(p, FrameType.Postcopy);
  if (!Buffer.isBuffer(m.needed) && !(m.needed instanceof Uint8Array)) throw bad('POSTCOPY needed must be a bitmap');
  const needed = Buffer.from(m.needed as Uint8Array);
  if (needed.length !== bitmapBytes(pageCount)) throw bad(`POSTCOPY bitmap of ${needed.length} bytes for ${pageCount} pages`);
  if (pageCount % 8 !== 0 && needed[needed.length - 1]! >> pageCount % 8 !== 0) throw bad('POSTCOPY bitmap names pages past the region');
  return { needed };
}

export const encodePostcopyRunning = (r: PostcopyRunning, version: number): Buffer => control(FrameType.PostcopyRunning, r, version);
export function decodePostcopyRunning(p: Buffer): PostcopyRunning {
  const m = decodeMap(p, FrameType.PostcopyRunning);
  if (typeof m.activateMs !== 'number' || !(m.activateMs >= 0)) throw bad('POSTCOPY_RUNNING activateMs must be a non-negative number');
  return { activateMs: m.activateMs };
}

export const encodeAttach = (a: Attach, version: number): Buffer => control(FrameType.Attach, a, version);
export function decodeAttach(p: Buffer): Attach {
  const m = decodeMap(p, FrameType.Attach);
  if (!isString(m.session, 64) || !/^[0-9a-f]{32}$/.test(m.session)) throw bad('ATTACH session must be 32 hex digits');
  if (m.role !== 'push' && m.role !== 'prio') throw bad(`ATTACH role must be push or prio, got ${String(m.role)}`);
  return { session: m.session, role: m.role };
}

export const encodeAttached = (a: Attached, version: number): Buffer => control(FrameType.Attached, a, version);
export function decodeAttached(p: Buffer, pageCount: number): Attached {
  const m = decodeMap(p, FrameType.Attached);
  if (!Buffer.isBuffer(m.held) && !(m.held instanceof Uint8Array)) throw bad('ATTACHED held must be a bitmap');
  const held = Buffer.from(m.held as Uint8Array);
  if (held.length !== 0 && held.length !== bitmapBytes(pageCount)) throw bad(`ATTACHED bitmap of ${held.length} bytes for ${pageCount} pages`);
  return { held };
}

/** One byte per page (0/1) from a bitmap of `pageCount` bits, and back (native: these run inside the pause). */
export function bitmapToBytes(bits: Buffer, pageCount: number): Uint8Array {
  return addon.unpackBits(bits, pageCount).bytes;
}
export function bytesToBitmap(bytes: Uint8Array): Buffer {
  return addon.packBits(bytes);
}
