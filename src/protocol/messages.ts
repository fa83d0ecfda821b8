/**
 * Control message payloads, one encode/decode pair per frame type: msgpack maps (page frames
 * are binary and built and parsed natively; their reference is test/reference/frames.ts).
 * Every decoder treats its input as hostile and throws ProtocolError.
 */
import { pack, unpack } from 'msgpackr';
import { addon, call } from '../native.js';
import { GUEST_NAME, GuestLayout, type RegionSpec } from '../guest/layout.js';
import type { LocalOffer } from '../guest/local.js';
import { ProtocolError } from './errors.js';
import { encodeFrame } from './frame.js';
import { coarsen, extentPages, fromChunkMap, toChunkMap } from '../pages/extents.js';
import { checkDisks, diskBytes, type DiskSpec } from '../disk/spec.js';
import {
  FLAG_PROVE,
  FLAGS_NONE,
  FrameType,
  MAX_CHANNELS,
  MAX_PAYLOAD,
  MAX_RESIDENT_CHUNK_PAGES,
  MAX_RESIDENT_MAP_BYTES,
  MAX_RESIDENT_RUNS,
  MIN_PROTOCOL_VERSION,
  PAGE_SIZE,
  PROTOCOL_VERSION,
} from './format.js';

export interface Hello {
  /** versions the sender speaks, [oldest, newest] */
  versions: [number, number];
  regionBytes: number;
  pageSize: number;
  /** authentication: reserved for a later version (pre-shared key, TLS); must be null now */
  auth: null;
  capabilities: string[];
  /** the guest's regions in its page space, in order (sizes sum to regionBytes); absent: one region */
  regions?: RegionSpec[];
  /** a same-host upgrade (CAP_LOCAL): where the memory is offered */
  local?: LocalOffer;
  /** with CAP_CHANNELS: the connections the sender would use, this one included (2..MAX_CHANNELS) */
  channels?: number;
  /** the name the guest is known by at the source (a daemon lists it by this name at the destination too) */
  guest?: string;
  /**
   * with CAP_HOLES: where the guest's memory held data when HELLO was sent (a reservation hint),
   * as page extents; on the wire as runs (`resident`) or a bitmap of chunks (`residentMap`),
   * whichever covers less beyond the data
   */
  resident?: Float64Array;
  /** huge pages under the guest's memory at the source, for the destination to reserve the same (absent: 4 KiB shmem) */
  backing?: HelloBacking;
  /** with CAP_DISKS: the guest's disks, after its memory in the page space (regionBytes counts them) */
  disks?: DiskSpec[];
}
export interface HelloBacking {
  kind: 'hugetlb' | 'shmem-thp';
  /** the huge page size, a power of two from 8 KiB to 1 GiB; hugetlb: every region's size is a multiple of it */
  pageSize: number;
}
export interface Accept {
  version: number;
  capabilities: string[];
  /** with CAP_POSTCOPY or CAP_CHANNELS: the token an ATTACH must name */
  session?: string;
  /** with CAP_CHANNELS: the connections granted, this one included (1..HELLO's channels) */
  channels?: number;
}
export interface ErrorMessage {
  code: string;
  message: string;
  phase: string;
}
export interface RoundEnd {
  round: number;
  pages: number;
  /** on an extra channel (CAP_CHANNELS): nothing follows on this connection */
  last?: true;
}
export interface Commit {
  digest: bigint;
  pageCount: number;
  /** with CAP_COMMIT_ACTIVATE: activate at once if the digest matches (no COMMIT_ACK, no ACTIVATE) */
  activate?: boolean;
  /** with disks: how many of the pause's pages were disk blocks (0: the images are durable as the last ROUND_ACK left them) */
  diskBlocks?: number;
}
export interface CommitAck {
  digest: bigint;
}
export interface Activated {
  activateMs: number;
}
export interface Abort {
  reason: string;
  /** the source's operator cancelled it (absent: a failure); a receiver that knows no such field ignores it */
  cancelled?: boolean;
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

export const encodeHello = (h: Hello): Buffer => control(FrameType.Hello, helloOnWire(h), PROTOCOL_VERSION);

/**
 * `resident` goes as the form that covers fewer pages beyond the data: its runs (joined across
 * their smallest gaps down to MAX_RESIDENT_RUNS) or a bitmap of chunks (`residentMap`).
 */
function helloOnWire(h: Hello): object {
  const { resident, ...rest } = h;
  if (!resident) return h;
  const runs = coarsen(resident, MAX_RESIDENT_RUNS);
  if (runs.length === resident.length) return { ...rest, resident: encodeRuns(runs) };
  const pageCount = Math.floor(h.regionBytes / PAGE_SIZE);
  const map = toChunkMap(resident, pageCount, MAX_RESIDENT_MAP_BYTES);
  if (extentPages(fromChunkMap(map.chunkPages, map.bits, pageCount)) >= extentPages(runs)) return { ...rest, resident: encodeRuns(runs) };
  const wire = Buffer.alloc(4 + map.bits.length);
  wire.writeUInt32LE(map.chunkPages, 0);
  map.bits.copy(wire, 4);
  return { ...rest, residentMap: wire };
}

function decodeChunkMap(v: unknown, pageCount: number): Float64Array {
  if (!Buffer.isBuffer(v) && !(v instanceof Uint8Array)) throw bad('HELLO residentMap must be binary');
  const b = Buffer.from(v.buffer, v.byteOffset, v.length);
  if (b.length < 5) throw bad('HELLO residentMap must hold a chunk size and a bitmap');
  const chunkPages = b.readUInt32LE(0);
  if (chunkPages === 0 || chunkPages > MAX_RESIDENT_CHUNK_PAGES || (chunkPages & (chunkPages - 1)) !== 0)
    throw bad(`HELLO residentMap chunk must be a power of two of at most ${MAX_RESIDENT_CHUNK_PAGES} pages`);
  const chunks = Math.ceil(pageCount / chunkPages);
  const bits = b.subarray(4);
  if (bits.length !== Math.ceil(chunks / 8) || bits.length > MAX_RESIDENT_MAP_BYTES)
    throw bad(`HELLO residentMap must be one bit per chunk of the region (${Math.ceil(chunks / 8)} bytes), at most ${MAX_RESIDENT_MAP_BYTES}`);
  if (chunks % 8 !== 0 && bits[bits.length - 1]! >> (chunks % 8) !== 0) throw bad('HELLO residentMap marks chunks beyond the region');
  return fromChunkMap(chunkPages, bits, pageCount);
}

/** page extents as u32 little-endian [first, end) pairs */
function encodeRuns(e: Float64Array): Buffer {
  const b = Buffer.alloc(e.length * 4);
  for (let i = 0; i < e.length; i++) b.writeUInt32LE(e[i]!, i * 4);
  return b;
}

function decodeRuns(v: unknown, pageCount: number): Float64Array {
  if (!Buffer.isBuffer(v) && !(v instanceof Uint8Array)) throw bad('HELLO resident must be binary');
  if (v.length % 8 !== 0 || v.length / 8 > MAX_RESIDENT_RUNS) throw bad(`HELLO resident must be at most ${MAX_RESIDENT_RUNS} pairs of u32`);
  const b = Buffer.from(v.buffer, v.byteOffset, v.length);
  const e = new Float64Array(v.length / 4);
  let last = 0;
  for (let i = 0; i < e.length; i += 2) {
    const first = b.readUInt32LE(i * 4);
    const end = b.readUInt32LE(i * 4 + 4);
    if (first < last || end <= first || end > pageCount) throw bad(`HELLO resident run ${i / 2} [${first}, ${end}) is out of order or outside the region`);
    e[i] = first;
    e[i + 1] = end;
    last = end;
  }
  return e;
}
export function decodeHello(p: Buffer): Hello {
  const m = decodeMap(p, FrameType.Hello);
  const v = m.versions;
  if (!Array.isArray(v) || v.length !== 2 || !isCount(v[0], 255) || !isCount(v[1], 255) || v[0] > v[1]) throw bad('HELLO versions must be [oldest, newest]');
  if (!isCount(m.regionBytes) || m.regionBytes === 0) throw bad('HELLO regionBytes must be a positive integer');
  if (!isCount(m.pageSize, 1 << 30) || m.pageSize === 0) throw bad('HELLO pageSize must be a positive integer');
  if (m.auth !== null) throw bad('HELLO auth must be null in protocol version 1 (authentication is not negotiated yet)');
  if (!Array.isArray(m.capabilities) || m.capabilities.length > 64 || !m.capabilities.every((c) => isString(c, 64)))
    throw bad('HELLO capabilities must be a list of short strings');
  const hello: Hello = { versions: [v[0], v[1]], regionBytes: m.regionBytes, pageSize: m.pageSize, auth: null, capabilities: m.capabilities as string[] };
  // disks follow the memory in the page space: the regions hold regionBytes less the disks
  if (m.disks !== undefined) hello.disks = checkDisks(m.disks, 'HELLO disk', (why) => bad(why));
  const memoryBytes = m.regionBytes - diskBytes(hello.disks);
  if (memoryBytes <= 0) throw bad(`HELLO regionBytes ${m.regionBytes} leaves no memory beside the disks`);
  if (m.regions !== undefined) {
    if (!Array.isArray(m.regions)) throw bad('HELLO regions must be a list');
    const layout = GuestLayout.checked(m.regions as RegionSpec[], 'HELLO regions', (why) => bad(why));
    if (layout.bytes !== memoryBytes) throw bad(`HELLO regions hold ${layout.bytes} bytes, regionBytes says ${memoryBytes} besides the disks`);
    hello.regions = layout.toWire();
  }
  if (m.local !== undefined) {
    const l = m.local as Record<string, unknown>;
    if (typeof l !== 'object' || l === null) throw bad('HELLO local must be a map');
    if (!isString(l.bootId, 64) || !/^[0-9a-f-]{1,64}$/.test(l.bootId)) throw bad('HELLO local bootId must be a boot id');
    if (!isString(l.socket, 107) || !l.socket.startsWith('/')) throw bad('HELLO local socket must be an absolute path of at most 107 characters');
    if (!isString(l.token, 32) || !/^[0-9a-f]{32}$/.test(l.token)) throw bad('HELLO local token must be 32 hex digits');
    hello.local = { bootId: l.bootId, socket: l.socket, token: l.token };
  }
  if (m.channels !== undefined) {
    if (!isCount(m.channels, MAX_CHANNELS) || m.channels < 2) throw bad(`HELLO channels must be an integer from 2 to ${MAX_CHANNELS}`);
    hello.channels = m.channels;
  }
  if (m.guest !== undefined) {
    if (!isString(m.guest, 63) || !GUEST_NAME.test(m.guest)) throw bad('HELLO guest must be 1..63 characters of [A-Za-z0-9._-]');
    hello.guest = m.guest;
  }
  if (m.resident !== undefined || m.residentMap !== undefined) {
    if (m.regionBytes % PAGE_SIZE !== 0) throw bad('HELLO resident needs a region of whole pages');
    if (m.resident !== undefined && m.residentMap !== undefined) throw bad('HELLO has resident and residentMap: one at most');
    hello.resident = m.resident !== undefined ? decodeRuns(m.resident, m.regionBytes / PAGE_SIZE) : decodeChunkMap(m.residentMap, m.regionBytes / PAGE_SIZE);
  }
  if (m.backing !== undefined) hello.backing = checkBacking(m.backing, hello);
  return hello;
}

function checkBacking(b: unknown, hello: Hello): HelloBacking {
  if (typeof b !== 'object' || b === null) throw bad('HELLO backing must be a map');
  const { kind, pageSize } = b as Record<string, unknown>;
  if (kind !== 'hugetlb' && kind !== 'shmem-thp') throw bad("HELLO backing kind must be 'hugetlb' or 'shmem-thp'");
  if (!isCount(pageSize, 1 << 30) || pageSize < 8192 || (pageSize & (pageSize - 1)) !== 0)
    throw bad('HELLO backing pageSize must be a power of two from 8 KiB to 1 GiB');
  // the destination's regions are windows of one hugetlbfs file: each must start and end on a huge page
  const sizes = hello.regions ? hello.regions.map((r) => r.size) : [hello.regionBytes];
  if (kind === 'hugetlb' && sizes.some((size) => size % pageSize !== 0))
    throw bad(`HELLO backing hugetlb: every region's size must be a multiple of ${pageSize}`);
  return { kind, pageSize };
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
  if (m.channels !== undefined && (!isCount(m.channels, MAX_CHANNELS) || m.channels < 1))
    throw bad(`ACCEPT channels must be an integer from 1 to ${MAX_CHANNELS}`);
  return {
    version: m.version,
    capabilities: m.capabilities as string[],
    ...(m.session !== undefined ? { session: m.session } : {}),
    ...(m.channels !== undefined ? { channels: m.channels } : {}),
  };
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
  if (m.last !== undefined && m.last !== true) throw bad('ROUND_END last must be true when present');
  return { round: m.round, pages: m.pages, ...(m.last === true ? { last: true as const } : {}) };
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
  if (m.diskBlocks !== undefined && !isCount(m.diskBlocks)) throw bad('COMMIT diskBlocks must be a count');
  return {
    digest: m.digest,
    pageCount: m.pageCount,
    ...(m.activate === true ? { activate: true } : {}),
    ...(m.diskBlocks !== undefined ? { diskBlocks: m.diskBlocks as number } : {}),
  };
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
  if (m.cancelled !== undefined && typeof m.cancelled !== 'boolean') throw bad('ABORT cancelled must be a boolean');
  return { reason: m.reason, ...(m.cancelled === true ? { cancelled: true } : {}) };
}

/** `prove` (version 3): the source commits next, so the destination answers with DIGEST. */
export function encodeDeviceState(state: Uint8Array, version: number, o: { prove?: boolean } = {}): Buffer {
  if (state.length > MAX_PAYLOAD) throw new ProtocolError('ERR_LIVEMIG_FRAME_TOO_LARGE', `device state of ${state.length} bytes exceeds ${MAX_PAYLOAD}`);
  return encodeFrame(FrameType.DeviceState, Buffer.from(state.buffer, state.byteOffset, state.byteLength), version, o.prove === true ? FLAG_PROVE : FLAGS_NONE);
}

/** DIGEST (version 3, R->S): the destination's digest of what it holds, computed on its own. */
export interface Digest {
  digest: bigint;
  pageCount: number;
}
export const encodeDigest = (d: Digest, version: number): Buffer => control(FrameType.Digest, d, version);
export function decodeDigest(p: Buffer): Digest {
  const m = decodeMap(p, FrameType.Digest);
  if (!isU64(m.digest) || !isCount(m.pageCount)) throw bad('DIGEST needs a u64 digest and a page count');
  return { digest: m.digest, pageCount: m.pageCount };
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

export interface Postcopy {
  /** 1 bit per page (page p: byte p>>3, bit p&7): the destination must fetch it; others it holds */
  needed: Buffer;
}
export interface PostcopyRunning {
  activateMs: number;
}
export type AttachRole = 'push' | 'prio' | 'channel';
export interface Attach {
  session: string;
  role: AttachRole;
  /** role channel: which one, 1..channels-1 (the migration's own connection is 0) */
  channel?: number;
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
  if (pageCount % 8 !== 0 && needed[needed.length - 1]! >> (pageCount % 8) !== 0) throw bad('POSTCOPY bitmap names pages past the region');
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
  if (m.role !== 'push' && m.role !== 'prio' && m.role !== 'channel') throw bad(`ATTACH role must be push, prio or channel, got ${String(m.role)}`);
  if (m.role !== 'channel') {
    if (m.channel !== undefined) throw bad(`ATTACH ${m.role} names a channel`);
    return { session: m.session, role: m.role };
  }
  if (!isCount(m.channel, MAX_CHANNELS - 1) || m.channel < 1) throw bad(`ATTACH channel must be an integer from 1 to ${MAX_CHANNELS - 1}`);
  return { session: m.session, role: m.role, channel: m.channel };
}

export interface Resolve {
  session: string;
}
export type ResolveOutcome = 'activated' | 'not-activated';
export interface Resolved {
  outcome: ResolveOutcome;
}

export const encodeResolve = (r: Resolve, version: number): Buffer => control(FrameType.Resolve, r, version);
export function decodeResolve(p: Buffer): Resolve {
  const m = decodeMap(p, FrameType.Resolve);
  if (!isString(m.session, 64) || !/^[0-9a-f]{32}$/.test(m.session)) throw bad('RESOLVE session must be 32 hex digits');
  return { session: m.session };
}

export const encodeResolved = (r: Resolved, version: number): Buffer => control(FrameType.Resolved, r, version);
export function decodeResolved(p: Buffer): Resolved {
  const m = decodeMap(p, FrameType.Resolved);
  if (m.outcome !== 'activated' && m.outcome !== 'not-activated') throw bad(`RESOLVED outcome must be activated or not-activated, got ${String(m.outcome)}`);
  return { outcome: m.outcome };
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
  return call('ERR_LIVEMIG_PROTOCOL', 'postcopy', 'unpacking a page bitmap', () => addon.unpackBits(bits, pageCount)).bytes;
}
export function bytesToBitmap(bytes: Uint8Array): Buffer {
  return call('ERR_LIVEMIG_SYSCALL', 'postcopy', 'packing a page bitmap', () => addon.packBits(bytes));
}
