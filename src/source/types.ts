import type { SourceDisk } from '../disk/spec.js';
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import type { GuestLayout } from '../guest/layout.js';
import type { MemoryPiece } from '../guest/local.js';
import type { Region } from '../region/region.js';
import type { DirtyTracker, RemoteTarget } from '../tracking/types.js';
import type { StallAction } from '../precopy/policy.js';
import type { Credentials, SecurityReport } from '../security/tls.js';

/** What a running migration's bandwidth cap is enforced by (src/pacing/pacer.ts). */
export interface BandwidthTarget {
  setCap(mibps: number | undefined): void;
}

/** Where a running migration is, read at any moment (between its progress events too). */
/** A disk's share of a running migration: its 4 KiB blocks sent so far (resends included). */
export interface DiskProgress {
  name: string;
  bytes: number;
  blocks_sent: number;
}

export interface MigrationStatus {
  stage: string;
  /** the guest's disks, each with its blocks sent so far (pre-copy; absent without disks) */
  disks?: DiskProgress[];
  /** the current pre-copy round (in stop-and-copy and post-copy: the last one) */
  round: number;
  /** bytes put on the wire so far (frames included, after encoding), and pages sent (resends included), counted as they go */
  bytes_sent: number;
  pages_sent: number;
  /**
   * pages still due: in pre-copy those of the current round not yet sent and those held back
   * for the stop; in stop-and-copy the stop's; in post-copy those not yet at the destination
   */
  pages_remaining: number;
  /** the guest's whole page space, pages, and the page size */
  pages_total: number;
  page_size: number;
  /** bandwidth achieved recently, MB/s (undefined before the first second of sending) */
  bandwidth_mbps: number | undefined;
  /**
   * pre-copy: pages the guest wrote since the tracker last re-armed (the current round's dirty
   * set so far, which its end will ask to send again): counted where the tracker can tell
   * without re-arming (peekWritten), otherwise estimated from the last round's rate; undefined
   * when neither is known (the first round, on a tracker that cannot count). 0 outside pre-copy.
   */
  dirty_pages: number | undefined;
  /** how fast the guest writes pages now, pages per second (as dirty_pages; undefined outside pre-copy) */
  dirty_pages_rate: number | undefined;
  /** the pause if pre-copy stopped now: what is due and what was written, at the bandwidth achieved (pre-copy only) */
  expected_downtime_ms: number | undefined;
  /** post-copy, once the guest runs at the destination: its pages on their way */
  postcopy?: { pages_needed: number; pages_left: number; pages_pushed: number; pages_served: number; faults: number };
}

/** Changes a running migration's settings (pass one as `control`, keep a reference). */
export class MigrationControl {
  #bandwidth: number | undefined;
  #downtimeLimit: number | undefined;
  #status: (() => MigrationStatus) | undefined;
  #target: BandwidthTarget | undefined;
  #postcopy = false;
  #postcopyBandwidth: number | undefined;
  /** the push runs: the pacer follows the post-copy cap, no longer the pre-copy one */
  #pushing = false;
  #cancel: (() => void) | undefined;

  /**
   * Ends the running migration before its point of commitment: the destination discards its
   * copy and the guest keeps (or resumes) running here; migrate() rejects with
   * ERR_LIVEMIG_CANCELLED. After commitment the guest may already run at the destination, and
   * cancel() throws ERR_LIVEMIG_STATE instead; so it does when no migration runs.
   */
  cancel(): void {
    if (!this.#cancel) throw new LivemigError('ERR_LIVEMIG_STATE', 'no migration is running under this control', { phase: 'cancel' });
    this.#cancel();
  }
  /** @internal the running migration's cancel; returns the unbinding */
  bindCancel(fn: () => void): () => void {
    this.#cancel = fn;
    return () => {
      if (this.#cancel === fn) this.#cancel = undefined;
    };
  }

  /** Switch to post-copy after the batch of pages being sent (the destination must offer it). */
  startPostcopy(): void {
    this.#postcopy = true;
  }
  /** @internal */
  get postcopyRequested(): boolean {
    return this.#postcopy;
  }

  /** A new downtime limit, ms: the convergence policy judges the next round's end by it. */
  setDowntimeLimit(ms: number): void {
    if (!(ms > 0) || !Number.isFinite(ms)) throw new RangeError(`the downtime limit must be a positive number of ms, got ${ms}`);
    this.#downtimeLimit = ms;
  }
  /** @internal the downtime limit set while running (undefined: the one the migration started with) */
  get downtimeLimitMs(): number | undefined {
    return this.#downtimeLimit;
  }

  /** Where the running migration is now; undefined when none runs under this control. */
  status(): MigrationStatus | undefined {
    return this.#status?.();
  }
  /** @internal the running migration answers status(); returns the unbinding */
  bindStatus(fn: () => MigrationStatus): () => void {
    this.#status = fn;
    return () => {
      if (this.#status === fn) this.#status = undefined;
    };
  }

  /** A new bandwidth cap for pre-copy in MiB/s, or undefined for none; takes effect at the next chunk. */
  setBandwidth(mibps: number | undefined): void {
    if (mibps !== undefined && !(mibps > 0)) throw new RangeError(`bandwidth must be a positive number of MiB/s, got ${mibps}`);
    this.#bandwidth = mibps;
    if (!this.#pushing) this.#target?.setCap(mibps);
  }
  /**
   * The post-copy push's own cap in MiB/s, or undefined for none (the default: the guest runs
   * at the destination and waits on every page not there yet; QEMU's max-postcopy-bandwidth).
   * Set before or during post-copy; takes effect at the next push call.
   */
  setPostcopyBandwidth(mibps: number | undefined): void {
    if (mibps !== undefined && !(mibps > 0)) throw new RangeError(`post-copy bandwidth must be a positive number of MiB/s, got ${mibps}`);
    this.#postcopyBandwidth = mibps;
    if (this.#pushing) this.#target?.setCap(mibps);
  }
  get postcopyBandwidth(): number | undefined {
    return this.#postcopyBandwidth;
  }
  /** @internal post-copy's push begins: the cap it goes at (set here, else `fallback`), which later setPostcopyBandwidth calls change */
  enterPostcopy(fallback: number | undefined): number | undefined {
    this.#pushing = true;
    this.#postcopyBandwidth ??= fallback;
    return this.#postcopyBandwidth;
  }
  get bandwidth(): number | undefined {
    return this.#bandwidth;
  }
  /** @internal the running migration's pacer receives every later setBandwidth; returns the unbinding */
  bind(target: BandwidthTarget): () => void {
    this.#target = target;
    return () => {
      if (this.#target === target) this.#target = undefined;
    };
  }
}

/** One pre-copy round, as progress events and the report give it (names after QEMU's query-migrate where they mean the same). */
export interface RoundStats {
  round: number;
  /** pages sent in this round */
  pages: number;
  /** bytes put on the wire in this round (frames included, after encoding) */
  bytes: number;
  duration_ms: number;
  /** throughput of this round, MB/s (10^6 bytes) */
  mbps: number;
  /** bandwidth achieved over the last second of sending, MB/s: what the estimate uses */
  bandwidth_mbps: number;
  /**
   * pages of this round's list it did not send: with the throttle stall policy a round after the
   * first is cut after about a second, and any round at the byte bound or a nearing deadline;
   * they join the next round (or the stop)
   */
  carried_pages: number;
  /** pages found dirty at the end of this round */
  dirty_pages: number;
  /** how fast the guest dirtied pages during the round: pages per second, and MB/s */
  dirty_pages_rate: number;
  dirty_mbps: number;
  /** writable working set: pages dirtied in each of the last rounds, held back for stop-and-copy */
  wws_pages: number;
  /** bytes sent so far, and bytes still to send if we stopped now (at the recent bytes per page) */
  transferred: number;
  remaining: number;
  /** pages still to send if we stopped now (the dirty ones and those held back): `remaining` in pages, not wire bytes */
  remaining_pages: number;
  /** estimated downtime if we stopped now */
  expected_downtime_ms: number;
  /** how much the guest's writes are throttled now, percent (auto-converge) */
  cpu_throttle_percentage: number;
  /** bandwidth cap in force during the round, MiB/s (0: none) */
  max_bandwidth_mib_s: number;
  decision: 'continue' | 'stop' | 'throttle' | 'postcopy' | 'abort';
  reason: string;
}

export type ProgressEvent =
  | { type: 'handshake'; prep_ms: number; version: number; tracker: string; tracker_reason: string; channels: number; channels_reason: string }
  | ({ type: 'round' } & RoundStats)
  | { type: 'stop-and-copy'; pages: number; bytes: number }
  | { type: 'committed'; digest: string }
  | { type: 'activated'; downtime_ms: number }
  | ({ type: 'postcopy' } & PostcopyStats);

export interface PostcopyStats {
  pages_pushed: number;
  /** pages sent on request, pages_resent included */
  pages_served: number;
  /** requested pages that had been pushed already and went again on the priority connection (their push copy was still on its way) */
  pages_resent: number;
  requests: number;
  bytes: number;
  reconnects: number;
}

/** what a pause is given: how long livemig may keep the guest paused, and whom to tell once it writes no more memory */
export interface PauseLease {
  maxPauseMs: number;
  onHalted?: () => void;
  /**
   * the guest stopped running at `at` (performance.now()), later than the pause was asked: its
   * downtime begins there (a QEMU VM runs on while its migration sets up, then stops)
   */
  onStopped?: (at: number) => void;
}

export interface MigrateOptions {
  /** the guest's memory, mapped in this process (several regions: back to back, as `layout` says) */
  region: Region;
  /** the guest's regions in `region`, in order (default: one region of the whole) */
  layout?: GuestLayout;
  /** the name the guest is known by (1..63 of [A-Za-z0-9._-]): a daemon at the destination lists it by this name */
  guestName?: string;
  /** where to send: host and port, or a connected socket */
  to: { host: string; port: number } | net.Socket;
  /**
   * pauses the guest and returns its device state (an opaque blob carried to the destination).
   * `maxPauseMs` is how long livemig may keep it paused before commitment: a guest may take a
   * lease from it and resume by itself when livemig stays silent past it (HANDOVER.md).
   * `onHalted`: a guest that goes on saving its device state after it stopped writing memory
   * (a QEMU: its devices after its block layer drained) says so, and the final collect and the
   * last pages go beside the rest of the save instead of after it.
   */
  pause(lease: PauseLease): Promise<Uint8Array>;
  /**
   * called with the guest paused, right before the point of commitment: from its return on the
   * guest must not resume by itself (it may run at the destination). A rejection (the guest
   * already resumed itself) aborts the migration before commitment.
   */
  commit?(): void | Promise<void>;
  /**
   * resumes the guest on the source: after a failure before commitment, or after it when the
   * destination said its activation failed (its copy is discarded: this is the only one)
   */
  resume(): Promise<void>;
  /** called once the destination has activated the guest: the source copy may go */
  release?(): Promise<void>;
  /** a tracker to use; by default the automatic choice (see chooseTracker) */
  tracker?: DirtyTracker;
  /** the guest writes from another process through its own mapping */
  target?: RemoteTarget;
  /**
   * the guest writes from another process that registered no write tracking: every page is
   * hashed each round (the report's tracker is 'hash', and its tracker_reason says why)
   */
  untracked?: boolean;
  /**
   * a same-host upgrade: the guest's memory as files (a memfd and its span per region of the
   * layout), which go to the destination by reference; no page is sent, only the device state.
   * The destination refuses unless it runs on this host.
   */
  local?: { pieces: MemoryPiece[] };
  /** stop-and-copy once the remaining pages fit this pause at the measured bandwidth (default 50 ms) */
  downtimeLimitMs?: number;
  /** at most this many pre-copy rounds before stop-and-copy (default 30) */
  maxRounds?: number;
  /** at most this many bytes sent in pre-copy before stop-and-copy (default 3x the region, as Xen) */
  maxBytes?: number;
  /**
   * what to do when the guest dirties memory as fast as it is sent, over several rounds:
   * 'throttle' (auto-converge through `throttle`; the default when it is given), 'postcopy',
   * 'force' (stop and copy anyway; the default otherwise) or 'abort' (the guest stays here)
   */
  onStall?: StallAction;
  /**
   * slows the guest's writes to (100 - percent)% (auto-converge); called with rising percents
   * while pre-copy does not converge, and with 0 before the guest resumes here after a failure.
   * The device state handed over at the switch should not carry the throttle.
   */
  throttle?(percent: number): Promise<void>;
  /** writable-working-set detection: hold back pages rewritten round after round (default on) */
  wws?: boolean;
  /** bandwidth cap of pre-copy, MiB/s (default none); change it while running with control.setBandwidth */
  bandwidthMiBps?: number;
  /** the post-copy push's own cap, MiB/s (default none: as fast as the link goes); control.setPostcopyBandwidth changes it */
  postcopyBandwidthMiBps?: number;
  /**
   * Clark's dynamic rate adaptation: the first round at startMiBps, each next one at the last
   * round's dirtying rate plus incrementMiBps, up to the cap; stop-and-copy at the cap
   */
  rateAdaptation?: { startMiBps: number; incrementMiBps: number };
  /** the migration completes, or ends with the guest still here, within this many ms */
  deadlineMs?: number;
  /** live controls: bandwidth changes while running */
  control?: MigrationControl;
  /** bytes of page data per PAGES frame (default 1 MiB) */
  batchBytes?: number;
  /**
   * page encodings (protocol version 2; each on by default): zero pages without payload,
   * references to content the destination holds, LZ4 where it pays (see src/encoding/chooser.ts)
   */
  encodings?: { zero?: boolean; dedup?: boolean; compress?: boolean };
  /**
   * 'precopy' (default): rounds, then stop-and-copy (or post-copy if the stall policy says so,
   * or control.startPostcopy() is called); 'postcopy': the guest moves at once and its pages
   * follow; 'hybrid': one pre-copy pass, then post-copy for what changed since
   */
  mode?: 'precopy' | 'postcopy' | 'hybrid';
  /** opens another connection to the destination (channels, post-copy; default: connect to `to` again) */
  connect?(): Promise<net.Socket>;
  /**
   * connections pre-copy's pages spread over, the first included (1..16; default: one per core
   * up to 4, within libuv's pool; the destination may grant fewer). Page p always goes on
   * channel floor(p / 256) mod N (docs/PROTOCOL.md, "Parallel channels").
   */
  channels?: number;
  /**
   * how pre-copy reads the guest's pages: through the source's own mapping of them, populated
   * while the destination reserves, or through the guest's files (pread). Default 'auto': both
   * are timed on the guest's pages and the faster wins (the report's read_path says which and
   * why); which is faster depends on the host (src/region/read-path.ts)
   */
  readPath?: 'auto' | 'mapping' | 'files';
  /**
   * the guest's disks (issue 33): each image moves with the memory, its blocks as pages after it;
   * which blocks were written is found by cloning the image (XFS, btrfs) or hashing it. The
   * destination must take disks (ReceiveOptions.disks). Pre-copy only, for now.
   */
  disks?: SourceDisk[];
  /** post-copy: how long to keep trying to reconnect after the link breaks (default 60 s) */
  recoverTimeoutMs?: number;
  /** handshake timeout (default 60 s: the destination may reserve gigabytes) */
  handshakeTimeoutMs?: number;
  /**
   * after the handshake, the longest time without progress (pages taken by the connection, a
   * round acknowledged) before the migration is aborted and the guest keeps running here;
   * default 30 s
   */
  progressTimeoutMs?: number;
  /**
   * the longest the guest may stay paused before the point of commitment: past it the
   * migration is aborted and the guest resumes here; default 5000 ms
   */
  maxPauseMs?: number;
  /**
   * after a lost link past the point of commitment, how long to keep asking the destination
   * (on new connections) whether it activated; default 30 s. Without an answer the guest stays
   * paused and the error says how to resolve it later (`livemig resolve`).
   */
  resolveTimeoutMs?: number;
  /**
   * authenticate both sides before the first frame, on every connection (src/security/tls.ts):
   * certificates (TLS 1.3) or a pre-shared key; without, the connection is not authenticated
   */
  credentials?: Credentials;
  /** migrate to a destination off loopback without credentials, on purpose (refused otherwise: ERR_LIVEMIG_INSECURE) */
  insecure?: boolean;
  onProgress?(event: ProgressEvent): void;
}

export interface MigrationReport {
  verified: boolean;
  mode: 'precopy' | 'postcopy' | 'hybrid';
  digest: string;
  prep_ms: number;
  total_ms: number;
  /** from the guest's pause to its activation at the destination, as the source measured it */
  downtime_ms: number;
  /** the downtime limit in force when pre-copy stopped (a PATCH while running included) */
  downtime_limit_ms: number;
  /** whether downtime_ms kept to it; when not, downtime_limit_missed says where the time went */
  downtime_limit_met: boolean;
  downtime_limit_missed?: string;
  /** the policy's estimate for the pause when it stopped (pre-copy only) */
  expected_downtime_ms?: number;
  rounds: number;
  region_bytes: number;
  /** each region of the guest, and the pages sent of it in pre-copy and stop-and-copy (post-copy's are in `postcopy`) */
  regions: { id: number; name: string; bytes: number; pages_sent: number }[];
  /** the guest's disks: each one's size, the 4 KiB blocks sent (a block sent twice counts twice), and their MB/s over total_ms */
  disks?: { name: string; bytes: number; blocks_sent: number; block_mbps: number }[];
  /**
   * what the guest's memory is made of at the source and the page size moved with it: `shmem`
   * (4 KiB), `shmem-thp` (transparent huge pages), `hugetlb` (hugetlbfs pages), `mixed`
   * (regions that differ). The wire carries 4 KiB pages either way; `tracking_page_size` is
   * what one write makes dirty (hugetlbfs under uffd-async: the whole huge page).
   */
  backing: { kind: string; page_size: number; tracking_page_size: number };
  /** why this tracker: the probe's findings, or that the guest registered none */
  tracker_reason: string;
  /** how pre-copy read the guest's pages: through the source's populated mapping or the guest's files, the faster on this host */
  read_path: 'mapping' | 'files';
  /** what each path cost a page when both were timed, or why they were not */
  read_path_reason: string;
  /** connections pre-copy's pages went on, and why that many */
  channels: number;
  channels_reason: string;
  /** a same-host upgrade: the memory went by reference, no page on the wire */
  local: boolean;
  wire_bytes: number;
  pages_sent: number;
  tracker: string;
  /**
   * pages by how they went: zero (no payload, or left out where the destination holds zero), dup (a reference), lz4, raw;
   * skipped = the destination held that content there already (a kept image)
   */
  zero_pages: number;
  dup_pages: number;
  lz4_pages: number;
  raw_pages: number;
  skipped_pages: number;
  /** pages the guest's memory held no data for (holes of its memfds): zero by definition, never read here nor sent */
  hole_pages: number;
  /** compressed / original bytes of the pages sent as lz4 (1 when none) */
  lz4_ratio: number;
  /** whether PAGES_ENC was negotiated with the destination */
  encodings: boolean;
  per_round: RoundStats[];
  /** why pre-copy ended, and whether a bound forced it (the downtime may exceed the limit then) */
  stop_reason: string;
  forced_stop: boolean;
  /** highest throttle applied, percent */
  max_throttle_percentage: number;
  stop_and_copy: {
    pages: number;
    bytes: number;
    pause_ms: number;
    /** of pause_ms, how long the guest ran on after the pause was asked (a QEMU VM while its migration sets up): not downtime */
    ran_after_pause_ms?: number;
    final_collect_ms: number;
    send_ms: number;
    commit_ms: number;
    activate_ms: number;
    /** with disks: the blocks written since the last round, which the pause sent (of `pages`) */
    disk_blocks?: number;
  };
  /** how the connections were secured */
  security: SecurityReport;
  /** post-copy phase: pages pushed and served on request, from the switch to completion */
  /** max_bandwidth_mib_s: the push's cap when it ended, 0 for none (as a round's) */
  postcopy?: PostcopyStats & { pages_needed: number; postcopy_ms: number; verify_ms: number; max_bandwidth_mib_s: number };
}
