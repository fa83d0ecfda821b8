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
  contentVerify(address: bigint, size: number, content: number, seed: bigint, writes: bigint, span: number, sequential: boolean): Promise<{ bad: number; firstBad: number }>;
  mix64(z: bigint): bigint;
  gateStart(fd: number, st: BigUint64Array): void;
  gatePaused(): boolean;
  gateSetPaused(paused: boolean): void;
  gateBeat(st: BigUint64Array): number;
  waitCommand(fd: number): { tag: number; body: Buffer } | null;
  replyCommand(fd: number, tag: number, body?: Buffer): void;
}

export const guestAddon: GuestAddon = loadBuilt<GuestAddon>('livemig_guest', "the reference guest's addon");
