/**
 * The reference guest's own addon (native/refguest/, built as livemig_guest.node): its content
 * generator and write stream, and its end of the control socket. The library does not load it;
 * only the reference guest, the demo and the tests do.
 */
import { loadBuilt } from '../native.js';

export interface GuestAddon {
  /**
   * address, size: the guest's live region (Region.address, Region.size), not a Buffer over it:
   * a Buffer over a gigabyte counts against V8's external-memory budget and sets off garbage
   * collections in the guest, where its heartbeat gap is measured
   */
  contentFill(address: bigint, size: number, content: number, seed: bigint): Promise<void>;
  guestWrite(address: bigint, size: number, st: BigUint64Array, n: number, span: number, sequential: boolean): number;
  contentVerify(
    address: bigint,
    size: number,
    content: number,
    seed: bigint,
    writes: bigint,
    span: number,
    sequential: boolean,
  ): Promise<{ bad: number; firstBad: number }>;
  mix64(z: bigint): bigint;
  /**
   * Serves livemig at `path` through the guest library (native/guest/livemig_guest.h) for the
   * life of the process: the pause closes the gate writes and beats pass, and answers with
   * `statePrefix` (the state's fixed fields as JSON, without its closing brace) and the run state.
   */
  serve(
    path: string,
    regions: { address: bigint; size: number; fd: number; offset?: number; tracked: boolean }[],
    st: BigUint64Array,
    statePrefix: string,
    how?: { name: string; register: boolean },
  ): void;
  gatePaused(): boolean;
  /** the percent of the rate livemig asked to withhold (auto-converge) */
  gateThrottle(): number;
  gateBeat(st: BigUint64Array): number;
  /** waits for livemig at `path` and maps the regions it hands over (blocking) */
  /** the regions as mapped here, each with the memfd the library keeps open and where the region starts in it */
  incomingOpen(
    path: string,
    timeoutMs: number,
  ): { handle: unknown; regions: (GuestMemory & { name: string; fd: number; offset: number })[]; disks: { name: string; size: number; fd: number }[] };
  /** serves livemig until it says run (true) or goes away (false); `loadState` returns why it refuses a state */
  incomingWait(handle: unknown, loadState: (state: Buffer) => string | undefined): boolean;
  incomingStatus(handle: unknown): { postcopy: boolean; allPresent: boolean };
  /** the guest's disk (native/guest/example/example_disk.h): created at path, its writes reported to livemig when `track` */
  diskCreate(path: string, size: number, seed: bigint, track: boolean): void;
  /** a disk livemig handed over, its write stream where the source's stopped */
  diskAdopt(fd: number, size: number, name: string, seed: bigint, xs: bigint, writes: bigint): void;
  /** its written-block bitmap, to be migrated again */
  diskTrack(): void;
  /** n block writes through the gate; how many were made (none while paused) */
  diskWrite(n: number): number;
  diskState(): { xs: bigint; writes: bigint };
  /** every block against the model (on a pool thread, at the lowest priority) */
  diskCheck(): Promise<{ bad: number; firstBad: number; blocks: number }>;
}

/** A guest's memory as its native code needs it: where it is mapped here, and how large. */
export interface GuestMemory {
  address: bigint;
  size: number;
}

export const guestAddon: GuestAddon = loadBuilt<GuestAddon>('livemig_guest', "the reference guest's addon");
