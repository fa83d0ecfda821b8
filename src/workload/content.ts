/**
 * The reference guest's content and write stream (docs/CONTENT.md), computed in native
 * code over whole regions.
 */
import { invalidArgument } from '../errors.js';
import { callAsync } from '../native.js';
import { guestAddon } from './guest-addon.js';
import type { GuestMemory } from './guest-addon.js';

export const CONTENTS = ['random', 'zero', 'text', 'dup', 'mixed', 'sparse'] as const;
export type ContentName = (typeof CONTENTS)[number];
export const PATTERNS = ['uniform', 'hot', 'sequential'] as const;
export type PatternName = (typeof PATTERNS)[number];

export function contentCode(name: string): number {
  const i = (CONTENTS as readonly string[]).indexOf(name);
  if (i < 0) throw invalidArgument(`content must be one of ${CONTENTS.join(', ')}, got ${name}`);
  return i;
}

/** Fills every page of `region` with `content` for `seed`. The pages must be 4096 bytes. */
export function fillContent(region: GuestMemory, content: ContentName, seed: bigint): Promise<void> {
  return callAsync('ERR_LIVEMIG_SYSCALL', 'workload', 'filling content', () => guestAddon.contentFill(region.address, region.size, contentCode(content), seed));
}

export interface WriteModel {
  content: ContentName;
  seed: bigint;
  /** writes made since the start of the stream */
  writes: bigint;
  /** pages the writes fall in */
  span: number;
  sequential: boolean;
}

/** Compares every page with what the model says it must hold; `bad` pages differ. */
export function verifyContent(region: GuestMemory, model: WriteModel): Promise<{ bad: number; firstBad: number }> {
  return callAsync('ERR_LIVEMIG_SYSCALL', 'workload', 'verifying content', () =>
    guestAddon.contentVerify(region.address, region.size, contentCode(model.content), model.seed, model.writes, model.span, model.sequential),
  );
}

/** The initial state of the guest's write stream for `seed`: [xorshift state, counter]. */
export function initialWriteState(seed: bigint): BigUint64Array {
  return BigUint64Array.of(guestAddon.mix64(seed) | 1n, 0n);
}
