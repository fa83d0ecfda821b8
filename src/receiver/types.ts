/** The destination's public types: options, progress events and the report. */
import type { FaultStats } from '../postcopy/dest.js';
import type { GuestLayout } from '../guest/layout.js';
import type { GuestRange } from '../native.js';
import type { Region } from '../region/region.js';
import type { Credentials, SecurityReport } from '../security/tls.js';

export type ReceiverState = 'hello' | 'reserve' | 'receiving' | 'committed' | 'activated' | 'postcopy' | 'failed';

export type ReceiveProgress =
  | { type: 'hello'; region_bytes: number; regions: { id: number; name: string; bytes: number }[]; local: boolean; peer: string; guest?: string }
  | { type: 'reserved'; region_bytes: number; reserve_ms: number }
  | { type: 'image'; path: string }
  | { type: 'image-ignored'; path: string; reason: string }
  | { type: 'round'; round: number; pages: number }
  | { type: 'committed'; digest: string }
  | { type: 'activated'; activate_ms: number }
  | { type: 'postcopy-running'; activate_ms: number; pages_needed: number }
  | { type: 'postcopy-disconnected'; message: string }
  | { type: 'postcopy-reconnected'; pages_held: number }
  | ({ type: 'postcopy-progress' } & FaultStats);

export interface ReceiveOptions {
  /** refuse regions larger than this (default: what the host's memory allows) */
  maxRegionBytes?: number;
  /**
   * Called at HELLO, after its checks and before anything is reserved: take `bytes` from a budget
   * shared by migrations running at once (a daemon's), or throw (ERR_LIVEMIG_NO_MEMORY) to refuse
   * the migration with nothing reserved. The returned function gives the bytes back when the
   * migration ends, whatever its outcome. A same-host upgrade (`local`) allocates nothing.
   * `guest`: the name the source knows the guest by (HELLO `guest`), for a daemon to refuse one
   * it already lists.
   */
  reserveMemory?(bytes: number, local: boolean, guest: string | undefined): () => void;
  /**
   * the most parallel channels granted to a source that asks for them (CAP_CHANNELS), 1..16;
   * default 16, never more than libuv's pool (UV_THREADPOOL_SIZE, 4 by default) less one
   */
  maxChannels?: number;
  /** refuse a device state larger than this (default 64 MiB, the protocol's maximum payload) */
  maxDeviceStateBytes?: number;
  /**
   * Touch every page the source said holds data before accepting (MADV_POPULATE_WRITE, one
   * pool thread per core), and write pages straight into the mapping from then on, as QEMU's
   * destination prealloc. Where the host is slow to hand over memory (a first touch can cost ms
   * per MiB on a host that is itself a VM) the first pass then runs at memory speed and the
   * preparation takes that time instead, while the guest still runs at the source. Default off:
   * without it the first touch happens in the page writes, overlapped with the transfer.
   */
  prealloc?: boolean;
  /**
   * Take the guest's disks (issue 33): each disk the source names is created as DIR/NAME.img
   * (perGuest: DIR/GUEST/NAME.img, the directory made as needed, for a daemon taking many
   * guests), sparse, never over an existing file, and removed if the migration fails before
   * activation. Without it, a migration with disks is refused before anything is reserved.
   */
  disks?: {
    dir: string;
    perGuest?: boolean;
    /** a migration that fails before the guest runs here keeps its images this long, for the guest's next try (src/disk/kept.ts) */
    keepMs?: number;
  };
  /**
   * Called at HELLO, after its checks and before anything is reserved, with the names of the
   * source's disks (none: an empty list): throw to refuse them (a QEMU destination whose command
   * line places other disks), the source's guest untouched.
   */
  acceptDisks?(names: readonly string[]): void;
  /**
   * called once the region is reserved, while its pages are being mapped and before any page
   * arrives: start the destination guest warm here; the handshake waits for the promise
   */
  onReserved?(region: Region, postcopy: 'planned' | 'possible' | 'no', layout: GuestLayout, memory: ReservedMemory): void | Promise<void>;
  /** called when the migration fails before activation (undo what onReserved started) */
  onDiscard?(region: Region): void;
  /** hands the verified region and device state to the guest; the guest runs here from then on */
  activate(region: Region, deviceState: Buffer): Promise<void>;
  /**
   * called as soon as the device state arrives, before the source commits: load and check it so
   * that `activate` only has to start the guest. A rejection fails the migration while the
   * source can still resume its guest. `pagesMissing`: the state came with a switch to
   * post-copy, so pages of the region are still to come (a guest whose load reads its memory
   * waits for activate, when faults are served).
   */
  prepare?(region: Region, deviceState: Buffer, o: { pagesMissing: boolean }): Promise<void>;
  onProgress?(event: ReceiveProgress): void;
  /** post-copy: every fault's latency (fault read to page mapped), ns, once all pages are here */
  onFaultLatencies?(nanoseconds: Float64Array): void;
  /**
   * an older image of the region this host kept (a file of exactly the region's size, e.g.
   * from a guest that left): its pages are loaded first and the sender sends only what differs
   */
  reuseImage?: string;
  /**
   * per migration, asked once its HELLO named the guest: the path of an image this host kept of
   * that guest (a daemon keeps what a guest it sent away left here), used as `reuseImage`
   */
  imageFor?(guest: string | undefined, bytes: number): string | undefined;
  /** time allowed between frames before giving up (default 60 s) */
  idleTimeoutMs?: number;
  /**
   * Post-copy support (capability `postcopy`): register the guest's mapping of the region for
   * minor faults (userfaultfd, UFFD_FEATURE_MINOR_SHMEM) before it resumes, and return the
   * userfaultfd (a descriptor in this process) and the mapping's address in the guest.
   * `activate` then resumes the guest with pages still missing; they arrive while it runs.
   */
  postcopy?: {
    register(region: Region): Promise<PostcopyRegistration>;
    /**
     * Why the guest's disks cannot follow by post-copy here (undefined: they can where the kernel
     * marks images for pre-content events). A migration with disks then goes by pre-copy, its
     * images never marked: a VMM that reads its images when it starts (QEMU) would wait on the mark.
     */
    disksRefusal?: string;
    /**
     * With disks: hands the guest the socket its VMM may ask for blocks on (lmg_disk_fetch,
     * lmg_disk_overwrite: docs/GUEST.md), a descriptor the guest takes a copy of
     */
    giveDiskAsks?(fd: number): void;
  };
  /** post-copy: how long to wait for the source to come back after a break (default 60 s) */
  recoverTimeoutMs?: number;
  /**
   * authenticate the source before its first frame, on every connection (src/security/tls.ts);
   * with certificates, `allow` names the sources admitted
   */
  credentials?: Credentials;
  /** how long the authentication may take (default 10 s) */
  authTimeoutMs?: number;
  /** listen off loopback without credentials, on purpose (refused otherwise: ERR_LIVEMIG_INSECURE) */
  insecure?: boolean;
}

/**
 * Where each region of the guest's memory is, for the destination guest: a descriptor and the
 * region's offset in it, one per region. Usually windows of the region's own memfd; in a
 * same-host upgrade (`local`), the source guest's own memfds, shared, with nothing copied (the
 * guest should then map without populating). The descriptors stay the receiver's.
 */
export interface ReservedMemory {
  files: { fd: number; offset: number }[];
  local: boolean;
  /**
   * the guest's disk images here, created empty; their blocks arrive with the memory's pages.
   * `fd` is the receiver's, open read-write: an incoming guest is handed a duplicate (the receiver closes its own)
   */
  disks?: { name: string; path: string; size: number; fd: number }[];
}

/**
 * The guest's registration for post-copy: livemig's copy of its userfaultfd (the receiver closes
 * it when done) and where the guest maps the region: one address, or one per region.
 */
export type PostcopyRegistration = { uffd: number; address: bigint } | { uffd: number; ranges: GuestRange[] };

export interface ReceiveReport {
  region_bytes: number;
  /** the guest's regions (HELLO's table) */
  regions: { id: number; name: string; bytes: number }[];
  /** a same-host upgrade: the memory came by reference, no page on the wire */
  local: boolean;
  reserve_ms: number;
  pages_received: number;
  rounds: number;
  digest: string;
  activate_ms: number;
  mode: 'precopy' | 'postcopy';
  /** how the source's connection was secured */
  security: SecurityReport;
  postcopy?: FaultStats & { pages_needed: number; total_ms: number; reconnects: number };
  /**
   * whether the source is known to have heard the outcome (it closed its connection after
   * ACTIVATED, or post-copy completed). When false it may ask later (RESOLVE): keep the
   * listener up for its resolve timeout (`livemig receive` lingers).
   */
  confirmed: boolean;
}
