/**
 * The destination's fault service (mechanism: native/postcopy/). The guest's mapping of the
 * region is registered for minor faults; livemig's own mapping receives the pages, and each is
 * mapped into the guest (UFFDIO_CONTINUE) once it is whole: at once when it was pushed, when it
 * arrives when a fault waits for it.
 */
import { LivemigError, type ErrorCode } from '../errors.js';
import { addon, call, type GuestRange, type NativePostcopyDest, type NativeWire, type PostcopyDiskRange, type PostcopyEvent } from '../native.js';
import type { Region } from '../region/region.js';

export interface FaultStats {
  /** faults the guest raised; of which on pages already here (mapped without a request) */
  faults: number;
  faults_local: number;
  /** pages that came because a fault asked for them, and pages pushed in the background */
  pages_pulled: number;
  pages_pushed: number;
  /** pages received twice (around a reconnection) and dropped */
  duplicates: number;
  /** total time guest threads waited on pages that had to come over the network, ms */
  blocked_ms: number;
  /** fault latency (fault read to page mapped), µs */
  fault_latency_p50_us: number;
  fault_latency_p99_us: number;
  bytes: number;
  /** disk post-copy: the guest's accesses to its disks, those that waited for blocks, and how long (µs) */
  disk_accesses?: number;
  /** the VMM's own asks (lmg_disk_fetch, lmg_disk_overwrite), and the blocks it overwrote whole with no fetch */
  disk_fetches?: number;
  disk_overwrites?: number;
  disk_blocks_overwritten?: number;
  disk_accesses_waited?: number;
  disk_wait_p50_us?: number;
  disk_wait_p99_us?: number;
}

export function percentile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
}

/** What a fault service starts with. */
export interface FaultServiceOptions {
  region: Region;
  /** the guest's userfaultfd, its mapping of the region registered for minor faults */
  uffd: number;
  /** where the region is mapped in the guest: one address, or ranges covering every page in order */
  guest: bigint | GuestRange[];
  /**
   * one byte per page: 1 if it must come from the source, 0 if the region already holds its
   * final content (sent in pre-copy and not dirtied since)
   */
  needed: Uint8Array;
  /** per-page hashes; those of held pages are kept, the others are set on arrival */
  hashes: BigUint64Array;
  /** the negotiated protocol version */
  version: number;
  /**
   * disk post-copy: the images' fanotify descriptor, the service's end of the socket the VMM
   * asks for blocks on (one or both), and where each disk lies after the memory
   */
  disks?: { fanotify?: number; asks?: number; ranges: PostcopyDiskRange[] };
}

export class FaultService {
  readonly #native: NativePostcopyDest;
  readonly #listeners = new Set<(e: PostcopyEvent) => void>();
  /** the destination's digest over every page's hash, once it holds every page */
  readonly complete: Promise<bigint>;
  /** the thread has mapped every page into the guest and unregistered: nothing more to serve */
  readonly done: Promise<void>;
  #stopped = false;
  readonly #disks: boolean;
  #broken: string | undefined;
  /** the attachment the current connections came with (the native service numbers them) */
  #generation = 0;

  /** why the current connections broke, if they did (heard before anyone listened, too) */
  get broken(): string | undefined {
    return this.#broken;
  }

  constructor(o: FaultServiceOptions) {
    const { region, needed } = o;
    this.#disks = o.disks !== undefined;
    if (needed.length !== region.pageCount)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `needed has ${needed.length} entries for ${region.pageCount} pages`, { phase: 'postcopy' });
    const onEvent = (e: PostcopyEvent): void => {
      // the break of connections since replaced says nothing about the current ones
      if (e.type === 'disconnected' && e.generation !== this.#generation) return;
      if (e.type === 'disconnected') this.#broken = e.message ?? 'the link broke';
      for (const l of this.#listeners) l(e);
    };
    this.#native = call(
      'ERR_LIVEMIG_SYSCALL',
      'postcopy',
      'starting the fault service',
      () =>
        new addon.PostcopyDest({
          region: region.nativeHandle,
          uffd: o.uffd,
          guest: o.guest,
          needed,
          hashes: o.hashes,
          version: o.version,
          onEvent,
          ...(o.disks?.fanotify !== undefined ? { fanotify: o.disks.fanotify } : {}),
          ...(o.disks?.asks !== undefined ? { diskAsks: o.disks.asks } : {}),
          ...(o.disks ? { disks: o.disks.ranges } : {}),
        }),
    );
    this.complete = new Promise((resolve, reject) => {
      this.on((e) => {
        if (e.type === 'complete') resolve(e.digest!);
        else if (e.type === 'error')
          reject(
            new LivemigError((e.code as ErrorCode | undefined) ?? 'ERR_LIVEMIG_SYSCALL', `post-copy fault service: ${e.message ?? 'failed'}`, {
              phase: 'postcopy',
            }),
          );
      });
    });
    this.complete.catch(() => undefined); // observed by whoever awaits it
    this.done = new Promise((resolve, reject) => {
      this.on((e) => {
        if (e.type === 'stopped') resolve();
        else if (e.type === 'error')
          reject(
            new LivemigError((e.code as ErrorCode | undefined) ?? 'ERR_LIVEMIG_SYSCALL', `post-copy fault service: ${e.message ?? 'failed'}`, {
              phase: 'postcopy',
            }),
          );
      });
    });
    this.done.catch(() => undefined);
  }

  /** Subscribes to the native thread's events; returns the unsubscribe function. */
  on(l: (e: PostcopyEvent) => void): () => void {
    this.#listeners.add(l);
    return () => this.#listeners.delete(l);
  }

  start(): void {
    this.#native.start();
  }

  /** Hands the service the two connections (push stream, priority requests); after a break, new ones. */
  attach(push: NativeWire, prio: NativeWire): void {
    this.#broken = undefined;
    this.#generation = this.#native.attach(push, prio);
  }

  /** One byte per page, 1 where the destination holds it now (asked for after a break). */
  held(): Uint8Array {
    return this.#native.held();
  }

  /** Every fault's latency so far (fault read to page mapped), ns. */
  latencies(): Float64Array {
    return this.#native.latencies();
  }

  /** How many pages the destination holds now. */
  heldCount(): number {
    return this.#native.stats().arrived;
  }

  stats(): FaultStats {
    const s = this.#native.stats();
    const lat = this.#native.latencies().sort();
    return {
      faults: s.faults,
      faults_local: s.faultsLocal,
      pages_pulled: s.pulled,
      pages_pushed: s.pushed,
      duplicates: s.duplicates,
      blocked_ms: +s.blockedMs.toFixed(3),
      fault_latency_p50_us: +(percentile(lat, 0.5) / 1e3).toFixed(1),
      fault_latency_p99_us: +(percentile(lat, 0.99) / 1e3).toFixed(1),
      bytes: s.bytes,
      ...(this.#disks ? this.#diskStats(s) : {}),
    };
  }

  #diskStats(s: ReturnType<NativePostcopyDest['stats']>): Partial<FaultStats> {
    const waits = this.#native.diskLatencies().sort();
    return {
      disk_accesses: s.diskAccesses,
      disk_fetches: s.diskFetches,
      disk_overwrites: s.diskOverwrites,
      disk_blocks_overwritten: s.diskPagesClaimed,
      disk_accesses_waited: s.diskAccessesWaited,
      disk_wait_p50_us: +(percentile(waits, 0.5) / 1e3).toFixed(1),
      disk_wait_p99_us: +(percentile(waits, 0.99) / 1e3).toFixed(1),
    };
  }

  /** How long each guest access to a disk waited for its blocks, ns. */
  diskLatencies(): Float64Array {
    return this.#native.diskLatencies();
  }

  get connected(): boolean {
    return this.#native.stats().connected;
  }

  /** Stops the thread (it stops by itself once every page is in the guest). */
  stop(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#native.stop();
  }
}
