/**
 * The reference guest's own addon (native/refguest/, built as livemig_guest.node): its content
 * generator and write stream, and its end of the control socket. The library does not load it;
 * only the reference guest, the demo and the tests do.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { LivemigError } from '../errors.js';

export interface GuestAddon {
  /** memory: a Buffer over the guest's whole mapping (Region.view()) */
  contentFill(memory: Buffer, content: number, seed: bigint): Promise<void>;
  guestWrite(memory: Buffer, st: BigUint64Array, n: number, span: number, sequential: boolean): number;
  contentVerify(memory: Buffer, content: number, seed: bigint, writes: bigint, span: number, sequential: boolean): Promise<{ bad: number; firstBad: number }>;
  mix64(z: bigint): bigint;
  gateStart(fd: number, st: BigUint64Array): void;
  gatePaused(): boolean;
  gateSetPaused(paused: boolean): void;
  gateBeat(st: BigUint64Array): number;
  waitCommand(fd: number): { tag: number; body: Buffer } | null;
  replyCommand(fd: number, tag: number, body?: Buffer): void;
}

const here = path.dirname(fileURLToPath(import.meta.url));

function load(): GuestAddon {
  const require = createRequire(import.meta.url);
  // dist/src/workload -> ../../../build/Release; src/workload run directly -> ../../build/Release
  const candidates = [path.join(here, '../../../build/Release/livemig_guest.node'), path.join(here, '../../build/Release/livemig_guest.node')];
  let lastError: unknown;
  for (const c of candidates) {
    try {
      return require(c) as GuestAddon;
    } catch (e) {
      lastError = e;
    }
  }
  throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', "the reference guest's addon is not built: run `npm install` (it runs node-gyp)", { phase: 'load', cause: lastError });
}

export const guestAddon: GuestAddon = load();
