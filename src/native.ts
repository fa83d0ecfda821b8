/**
 * The only module that loads the addon. Every native call goes through here so that a
 * kernel error becomes a LivemigError created at the caller's stack, with a stable code.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { LivemigError, type ErrorCode } from './errors.js';

/** What a sendPages call wrote: bytes, and pages per encoding (all `raw` for PAGES frames). */
export interface SendCounts {
  bytes: number;
  zero: number;
  dup: number;
  skipped: number;
  raw: number;
  /** time spent classifying and indexing (the encoding work), not sending or hashing */
  overheadMs: number;
  /** of which indexing pages after the send */
  indexMs: number;
}

/** One sendPages call across the boundary (see FramedConnection.sendPages for the fields). */
export interface NativeSendPages {
  region: NativeRegion;
  pages: Uint32Array;
  round: number;
  version: number;
  batchPages: number;
  hashes: BigUint64Array;
  dedup?: NativeDedup;
  flags: number;
  now: boolean;
}

/**
 * One classified batch as one PAGES_ENC frame (src/encoding/encoder.ts): per page its
 * encoding (or skip), raw bodies in `staging` and LZ4 bodies in `lz4` at page k's offset,
 * `lengths[k]` an LZ4 body's bytes or a dup's source page; the dup's hash from `hashes`.
 */
export interface NativeSendEncoded {
  pages: Uint32Array;
  encodings: Uint8Array;
  staging: Buffer;
  lz4: Buffer;
  lengths: Int32Array;
  hashes: BigUint64Array;
  round: number;
  version: number;
}

/** The record keys of an encrypted connection, one direction each (from the TLS exporter). */
export interface WireKeys {
  send: { key: Buffer; salt: Buffer };
  receive: { key: Buffer; salt: Buffer };
  /** the peer's records already opened before the Wire (its first frame's, src/receiver/admit.ts) */
  received?: number;
}

export interface NativeWire {
  write(buffers: Buffer[]): Promise<void>;
  /** bytes the kernel took at once; encrypted, -1: the frame was sealed whole and part of it waits for a write() */
  writeNow(buffers: Buffer[]): number;
  readNow(o: { maxPayload: number; maxType: number; limits?: Uint32Array }): NativeFrame | null;
  /** bytes of the peer's that arrived and were not read yet */
  unread(): number;
  sendPages(o: NativeSendPages): Promise<SendCounts>;
  sendEncoded(o: NativeSendEncoded): Promise<number>;
  read(o: {
    maxPayload: number;
    maxType: number;
    limits?: Uint32Array;
    sink?: { region: NativeRegion; hashes: BigUint64Array; version: number; maxBatchPages: number; encodings?: boolean; channels?: number; channel?: number };
  }): Promise<NativeFrame>;
  /** half-closes, then reads and drops until the peer closes (true: its orderly close came) or timeoutMs passes */
  finish(timeoutMs: number): Promise<boolean>;
  /** whether the peer already closed or reset the connection (nothing unread before its end) */
  peerGone(): boolean;
  shutdown(): void;
  close(): void;
  setTimeouts(recvMs: number, sendMs: number): void;
  fd(): number;
  forget(): void;
}

/** An access to a watched file, waiting (native/disk/precontent.cc): offset and count in bytes, -1 if the kernel gave no range. */
/** a mapped written-block bitmap (native/disk/written_bitmap.cc) */
export type WrittenBitmapHandle = { readonly __writtenBitmap: unique symbol };

export interface PrecontentEvent {
  fd: number;
  pid: number;
  mask: number;
  offset: number;
  count: number;
}

/** The sender's index of what the receiver holds (native/codec/encode.h). */
export interface NativeDedup {
  /** with channels: only the pages of `channel`'s stripes */
  initImage(hashes: BigUint64Array, channels?: number, channel?: number): void;
  size(): number;
}

export interface NativeFrame {
  version: number;
  type: number;
  flags: number;
  payload: Buffer;
  pages: number;
  batches: number;
  bytes: number;
  lastRound: number;
}

export interface NativeRegion {
  readonly fd: number;
  readonly size: number;
  readonly id: bigint;
  readonly address: bigint;
  readonly released: boolean;
  view(offset: number, length: number): Buffer;
  release(): boolean;
  reserve(): void;
  /** extents: [firstPage, endPage, ...] to allocate only those pages */
  reserveAsync(extents?: Float64Array): Promise<void>;
  populate(): void;
  /** extents: [firstPage, endPage, ...] to populate only those pages */
  populateAsync(forWrite?: boolean, extents?: Float64Array): Promise<void>;
  /** the pages whose backing files hold data, as [firstPage, endPage, ...] (lseek SEEK_DATA/SEEK_HOLE) */
  dataExtentsAsync(within?: Float64Array, now?: boolean): Promise<Float64Array>;
}

/** from a post-copy thread: complete (with the destination's digest), disconnected, error, stopped */
export interface PostcopyEvent {
  type: 'complete' | 'disconnected' | 'error' | 'stopped';
  message?: string;
  code?: string;
  digest?: bigint;
  /** disconnected: the attachment (1, 2, ... per attach) the event is about */
  generation?: number;
}

/** What the destination's fault service starts with (native/postcopy/dest.cc checks each field). */
export interface NativePostcopyDestOptions {
  region: NativeRegion;
  /** the guest's userfaultfd, its mapping registered for minor faults */
  uffd: number;
  /** where the region is mapped in the guest: one address, or ranges covering every page in order */
  guest: bigint | GuestRange[];
  /** one byte per page, 1: it must come from the source; becomes the service's state table */
  needed: Uint8Array;
  /** per-page hashes: those of held pages are kept, the others set on arrival */
  hashes: BigUint64Array;
  /** the negotiated protocol version */
  version: number;
  onEvent: (e: PostcopyEvent) => void;
  /** disk post-copy: the fanotify descriptor every image is marked on, and where each disk lies (after the memory) */
  fanotify?: number;
  /** disk post-copy: the service's end of the SOCK_SEQPACKET pair the guest's VMM asks for blocks on */
  diskAsks?: number;
  disks?: PostcopyDiskRange[];
}

/** A disk in the page space, and which file it is (dev, ino): its accesses wait for its missing blocks. */
export interface PostcopyDiskRange {
  firstPage: number;
  pages: number;
  dev: number;
  ino: number;
}

/** What the source's page server starts with (native/postcopy/source.cc checks each field). */
export interface NativePostcopySourceOptions {
  region: NativeRegion;
  /** one byte per page, 1: the destination needs it */
  needed: Uint8Array;
  /** the negotiated protocol version */
  version: number;
  /** the round its PAGES frames carry */
  round: number;
  /** if given, each page sent is hashed into it */
  hashes?: BigUint64Array;
  onEvent: (e: PostcopyEvent) => void;
}

export interface NativePostcopyDest {
  start(): void;
  /** returns the attachment's number: its "disconnected" event carries it */
  attach(push: NativeWire, prio: NativeWire): number;
  stats(): {
    faults: number;
    faultsLocal: number;
    pulled: number;
    pushed: number;
    duplicates: number;
    arrived: number;
    blockedMs: number;
    /** guest accesses to its disks, and those that waited for blocks to come */
    diskAccesses: number;
    diskAccessesWaited: number;
    /** the VMM's own asks (lmg_disk_fetch, lmg_disk_overwrite), and the blocks it overwrote whole without a fetch */
    diskFetches: number;
    diskOverwrites: number;
    diskPagesClaimed: number;
    bytes: number;
    connected: boolean;
  };
  latencies(): Float64Array;
  /** how long each guest access to a disk waited for blocks that had to come, ns */
  diskLatencies(): Float64Array;
  held(): Uint8Array;
  stop(): void;
}

export interface NativePostcopySource {
  attach(push: NativeWire, prio: NativeWire): void;
  push(pages: Uint32Array, batchPages: number): Promise<{ pages: number; bytes: number }>;
  recent(): Uint32Array;
  reset(pages: Uint8Array, meaning: 'held' | 'needed'): void;
  unsent(): Uint32Array;
  stats(): { requests: number; served: number; pushed: number; servedBytes: number; resent: number };
  detach(): void;
}

export interface NativeWireFormat {
  magic: number;
  headerBytes: number;
  protocolVersion: number;
  minProtocolVersion: number;
  maxPayload: number;
  flagsNone: number;
  flagProve: number;
  pageSize: number;
  maxBatchPages: number;
  pagesPrefixBytes: number;
  dupBodyBytes: number;
  maxLz4Group: number;
  stripePages: number;
  maxChannels: number;
  maxFrameType: number;
  frameTypes: Record<string, number>;
  pageEncodings: Record<string, number>;
}

/** the guest contract as native/guest/livemig_guest.h defines it (test/guest-contract.test.ts) */
export interface NativeGuestContract {
  contract: number;
  oldestContract: number;
  maxRegions: number;
  nameMaxLength: number;
  maxBody: number;
  maxHello: number;
  /** LMG_TAG_* without the prefix: {HELLO: 0x48, …} */
  tags: Record<string, number>;
}

/** one message of the guest contract: its tag, body and the descriptors that came with it (the receiver owns them) */
export interface ControlMessage {
  tag: number;
  body: Buffer;
  fds: number[];
}

/** where a region of the guest's page space is mapped in the guest */
export interface GuestRange {
  address: bigint;
  firstPage: number;
  pages: number;
}

interface Addon {
  /** hugePageSize > 0: a hugetlbfs memfd of that page size; thp: the mapping advised MADV_HUGEPAGE */
  regionCreate(size: number, name: string, hugePageSize?: number, thp?: boolean): NativeRegion;
  /** whether the file is on hugetlbfs, and its block size (the huge page size there) */
  fileBacking(fd: number): { hugetlb: boolean; blockSize: number };
  regionAdopt(fd: number, size: number): NativeRegion;
  /** one mapping of every piece back to back (a guest's regions in one page space) */
  regionAdoptPieces(pieces: { fd: number; offset: number; size: number }[]): NativeRegion;
  regionAttach(id: bigint): NativeRegion | null;
  pageSize(): number;
  uffdProbe(): bigint;
  uffdWriteProtect(address: bigint, length: number, features: bigint): number;
  pagemapOpen(pid: number): number;
  pagemapScanSync(fd: number, start: bigint, length: number, pageSize: number, rearm: boolean): Uint32Array;
  pagemapScan(fd: number, start: bigint, length: number, pageSize: number, rearm: boolean): Promise<Uint32Array>;
  softDirtyClear(pid: number): void;
  softDirtyScan(fd: number, start: bigint, length: number, pageSize: number, rearm: boolean): Promise<Uint32Array>;
  softDirtyProbe(): boolean;
  closeFd(fd: number): void;
  xxh64(data: Buffer, seed: bigint): bigint;
  hashCompare(region: NativeRegion, firstPage: number, count: number, pageSize: number, hashes: BigUint64Array): Promise<Uint32Array>;
  unixListen(path: string): number;
  unixConnect(path: string): number;
  unixAccept(fd: number, timeoutMs: number): Promise<number>;
  /** a descriptor of our own for a connection Node accepted */
  unixDup(fd: number): number;
  /** whether the peer of an idle connection has closed it (nothing is read) */
  unixPeerClosed(fd: number): boolean;
  /** the pid of the process at the other end of a unix socket (SO_PEERCRED) */
  unixPeerPid(fd: number): number;
  digestTable(hashes: BigUint64Array): bigint;
  /** data: a byte per page, 0 for a hole (not read; the zero page hash) */
  hashAll(region: NativeRegion, hashes: BigUint64Array, data?: Uint8Array): Promise<void>;
  Wire: new (fd: number, keys?: WireKeys) => NativeWire;
  pageHash(data: Buffer): bigint;
  Dedup: new (pageCount: number) => NativeDedup;
  classifyPages(
    region: NativeRegion,
    pages: Uint32Array,
    staging: Buffer,
    hashes: BigUint64Array,
    dedup: NativeDedup,
    flags: number,
    sources: Int32Array,
  ): Promise<Uint8Array>;
  samplePages(region: NativeRegion, pages: Uint32Array, staging: Buffer): Uint8Array;
  /** runs of `run` pages read alternately through the mapping and through the files: each run's ns */
  compareReadPathsAsync(region: NativeRegion, pages: Uint32Array, run: number): Promise<Float64Array>;
  /** the source's reads of the region's pages go through its populated mapping (native/region/read_path.h) */
  regionReadInPlace(region: NativeRegion, on: boolean): void;
  /** dst becomes a clone of src sharing its extents (FICLONE: XFS, btrfs); src's dirty pages are written back first */
  fileCloneAsync(src: number, dst: number): Promise<void>;
  /** every extent of the file after a write-back: [logical, physical, length, flags, ...] in bytes (FIEMAP) */
  fileExtentsAsync(fd: number): Promise<Float64Array>;
  /** the ranges ([offset, length, ...], bytes) allocated in the file, its size kept (fallocate) */
  fileAllocateAsync(fd: number, ranges: Float64Array): Promise<void>;
  /** the page hash of each block of the file as pread reads it now (past its end: zeros) */
  hashFileBlocksAsync(fd: number, blockSize: number, firstBlock: number, count: number): Promise<BigUint64Array>;
  /** the files the region maps, in order (its own duplicates, valid until it is released) */
  regionPieces(region: NativeRegion): { fd: number; offset: number; size: number }[];
  /** a guest's written-block bitmap (contract 4), mapped: the memfd must be sealed against shrinking */
  writtenBitmapOpen(fd: number, blocks: number): WrittenBitmapHandle;
  /** the blocks marked since the last take, as [first, end) runs, their bits cleared atomically */
  writtenBitmapTake(handle: WrittenBitmapHandle): Float64Array;
  writtenBitmapClose(handle: WrittenBitmapHandle): void;
  /** reads and writes of the file wait for an answer from the returned fanotify descriptor (FAN_PRE_ACCESS) */
  precontentWatch(path: string, fan?: number): number;
  /** the access events that came within the timeout, each to be answered */
  precontentNextAsync(fan: number, timeoutMs: number): Promise<PrecontentEvent[]>;
  /** the waiting access goes on (allow) or fails with EIO; closes the event's descriptor */
  precontentRespond(fan: number, eventFd: number, allow: boolean): void;
  /** the mark goes; an access still waiting is allowed */
  precontentUnwatch(fan: number): void;
  /** the same on a pool thread: accesses go on at once, the group's teardown (a grace period) off this thread */
  precontentUnwatchAsync(fan: number): Promise<void>;
  /** a receiver's pages land in the region's mapping, populated for write (not its files) */
  regionWriteInPlace(region: NativeRegion, on: boolean): void;
  lz4DecodePage(src: Buffer, pageSize: number): Buffer | null;
  zeroPageHash(): bigint;
  pageHashVariants(data: Buffer): bigint[];
  PostcopyDest: new (o: NativePostcopyDestOptions) => NativePostcopyDest;
  PostcopySource: new (o: NativePostcopySourceOptions) => NativePostcopySource;
  uffdRegisterMinor(address: bigint, length: number): number;
  packBits(bytes: Uint8Array): Buffer;
  unpackBits(bits: Uint8Array, count: number, into?: Uint8Array): { bytes: Uint8Array; set: number };
  setShortSlices(ns: number): { threads: number; applied: boolean };
  /** from now on the kernel ignores SIGTERM, SIGINT and SIGHUP (a daemon that has begun its shutdown) */
  ignoreStopSignals(): void;
  /** ends the process at once with `code`, without Node's teardown (a daemon whose shutdown is complete) */
  exitNow(code: number): never;
  setThreadSlice(ns: number): boolean;
  idleProcess(pid: number): number;
  /** a connected pair: a stream, or with `seqpacket` messages that keep their bounds */
  socketPair(seqpacket?: boolean): [number, number];
  /** the guest contract's messages, framed by the guest library's own code (native/guest/livemig_guest.h) */
  controlRequest(fd: number, tag: number, timeoutMs: number, body?: Buffer): ControlMessage;
  controlSend(fd: number, tag: number, body?: Buffer, fds?: number[]): void;
  controlReceive(fd: number, timeoutMs: number): ControlMessage;
  controlReceiveAsync(fd: number, timeoutMs: number): Promise<ControlMessage>;
  /** the guest contract's version, limits and tags as the addon was built with them */
  guestContract(): NativeGuestContract;
  /** AES-256-GCM records (native/io/aead.h), sealed or opened in turn from counter 0 */
  aeadSeal(key: Buffer, salt: Buffer, records: Buffer[]): Buffer[];
  aeadOpen(key: Buffer, salt: Buffer, sealed: Buffer[]): Buffer[];
  aeadThroughput(bytes: number, recordBytes: number): { sealMs: number; openMs: number };
  /** 0 if a loopback TCP socket takes TCP_ULP "tls", else its errno (-1: the probe's sockets failed) */
  kernelTlsErrno(): number;
  /** the wire format's constants as the addon was built with them (test/format.test.ts) */
  wireFormat(): NativeWireFormat;
  /** the wire's header rules for a header read outside a Wire; throws as read() would */
  checkFrameHeader(header: Buffer, maxPayload: number): { version: number; type: number; flags: number; length: number };
  /** the whole records at the front of `bytes` (one direction of a stream, the first numbered `first`), opened */
  openStreamRecords(keys: { key: Buffer; salt: Buffer }, first: number, bytes: Buffer): { plain: Buffer; records: number; consumed: number };
  UFFD_FEATURE_WP_ASYNC: bigint;
  UFFD_FEATURE_WP_UNPOPULATED: bigint;
  UFFD_FEATURE_WP_HUGETLBFS_SHMEM: bigint;
}

const here = path.dirname(fileURLToPath(import.meta.url));

/**
 * Loads one of the addons node-gyp built (build/Release/NAME.node): from dist/src/native.js
 * that is ../../build/Release, from src/native.ts run directly ../build/Release.
 */
export function loadBuilt<T>(name: string, what: string): T {
  const require = createRequire(import.meta.url);
  const candidates = [path.join(here, `../../build/Release/${name}.node`), path.join(here, `../build/Release/${name}.node`)];
  let lastError: unknown;
  for (const c of candidates) {
    try {
      return require(c) as T;
    } catch (e) {
      // built, but this host is not one it can run on (its page size): say so, not "not built"
      if ((e as { code?: string }).code !== 'MODULE_NOT_FOUND')
        throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `${what} cannot load: ${(e as Error).message}`, { phase: 'load', cause: e });
      lastError = e;
    }
  }
  throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `${what} is not built: run \`npm install\` (it runs node-gyp)`, { phase: 'load', cause: lastError });
}

export const addon: Addon = loadBuilt<Addon>('livemig', 'the livemig native addon');

interface NativeErrorShape {
  message?: string;
  syscall?: string;
  errno?: number;
  errnoName?: string;
  released?: boolean;
  /** set by the addon for failures that are not a system call's (a peer breaking the protocol) */
  livemigCode?: ErrorCode;
}

/** Converts an error thrown by the addon into a LivemigError. */
export function fromNative(e: unknown, code: ErrorCode, phase: string, what: string): LivemigError {
  if (e instanceof LivemigError) return e;
  const n = (e ?? {}) as NativeErrorShape;
  if (n.released) return new LivemigError('ERR_LIVEMIG_RELEASED', `${what}: the region has been released`, { phase, cause: e });
  if (n.livemigCode) {
    const protocol = n.livemigCode !== 'ERR_LIVEMIG_CONNECTION' && n.livemigCode !== 'ERR_LIVEMIG_TIMEOUT';
    return new LivemigError(n.livemigCode, n.message ?? what, { phase: protocol ? 'protocol' : phase });
  }
  const errnoName = n.errnoName;
  const finalCode: ErrorCode = errnoName === 'ENOMEM' || errnoName === 'ENOSPC' ? 'ERR_LIVEMIG_NO_MEMORY' : code;
  const detail = n.message ?? String(e);
  const opts = { phase, cause: e } as const;
  return new LivemigError(finalCode, `${what}: ${detail}`, {
    ...opts,
    ...(n.syscall === undefined ? {} : { syscall: n.syscall }),
    ...(n.errno === undefined ? {} : { errno: n.errno }),
    ...(errnoName === undefined ? {} : { errnoName }),
  });
}

/** Runs a synchronous native call; a failure surfaces as a LivemigError thrown here. */
export function call<T>(code: ErrorCode, phase: string, what: string, fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    throw fromNative(e, code, phase, what);
  }
}

/** Awaits a native promise; the error is created here so its stack points at the caller. */
export async function callAsync<T>(code: ErrorCode, phase: string, what: string, fn: () => Promise<T>): Promise<T> {
  const site = new Error();
  try {
    return await fn();
  } catch (e) {
    const err = fromNative(e, code, phase, what);
    if (site.stack) err.stack = `${err.name}: ${err.message}\n${site.stack.split('\n').slice(1).join('\n')}`;
    throw err;
  }
}

/** The commitment digest over a table of page hashes (XXH64 of the table). */
export function digestOf(hashes: BigUint64Array, phase: string): bigint {
  return call('ERR_LIVEMIG_SYSCALL', phase, 'computing the image digest', () => addon.digestTable(hashes));
}

/** Closes a descriptor this process owns (a failure is a bug here: EBADF). */
export function closeFd(fd: number, phase: string): void {
  call('ERR_LIVEMIG_SYSCALL', phase, `closing descriptor ${fd}`, () => addon.closeFd(fd));
}

/**
 * The threads of libuv's pool in this process (UV_THREADPOOL_SIZE, read by libuv once at
 * start; 4 unless set). Native reads and sends are pool tasks that block on their connection,
 * so this bounds how many run at once.
 */
export function threadPoolSize(): number {
  const n = Number(process.env['UV_THREADPOOL_SIZE'] ?? 4);
  return Number.isInteger(n) && n > 0 ? n : 4;
}
