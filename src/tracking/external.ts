/**
 * The integrator reports dirty pages itself (a KVM dirty bitmap, a device model's log):
 * markDirty() takes a bitmap (Uint8Array or BigUint64Array; bit i = page i, little-endian,
 * as KVM_GET_DIRTY_LOG returns it) or a list of page indices (Uint32Array or number[]).
 */
import { invalidArgument } from '../errors.js';
import type { Region } from '../region/region.js';
import { TrackerState } from './state.js';
import type { DirtyTracker } from './types.js';

export type DirtyReport = Uint8Array | BigUint64Array | Uint32Array | readonly number[];

export class ExternalTracker implements DirtyTracker {
  readonly backend = 'external' as const;
  readonly pageCount: number;
  readonly #state = new TrackerState('external');
  #bitmap: Uint8Array;

  constructor(region: Region | { pageCount: number }) {
    this.pageCount = region.pageCount;
    this.#bitmap = new Uint8Array(Math.ceil(this.pageCount / 8));
  }

  async start(): Promise<void> {
    this.#state.beginStart();
    this.#bitmap.fill(0);
    this.#state.started();
  }

  /** Records pages as written. `firstPage` offsets a bitmap that covers part of the region. */
  markDirty(report: DirtyReport, firstPage = 0): void {
    if (!Number.isInteger(firstPage) || firstPage < 0 || firstPage >= this.pageCount) {
      throw invalidArgument(`firstPage must be an integer in 0..${this.pageCount - 1}, got ${firstPage}`);
    }
    if (report instanceof Uint8Array || report instanceof BigUint64Array) {
      const bytes = report instanceof Uint8Array ? report : new Uint8Array(report.buffer, report.byteOffset, report.byteLength);
      this.#orBitmap(bytes, firstPage);
      return;
    }
    if (!(report instanceof Uint32Array) && !Array.isArray(report)) {
      throw invalidArgument('markDirty expects a bitmap (Uint8Array, BigUint64Array) or page indices (Uint32Array, number[])');
    }
    const map = this.#bitmap;
    for (let k = 0; k < report.length; k++) {
      const p = (report[k] as number) + firstPage;
      if (!Number.isInteger(p) || p < 0 || p >= this.pageCount) {
        throw invalidArgument(`page index ${String(report[k])} (+${firstPage}) is outside 0..${this.pageCount - 1}`);
      }
      map[p >>> 3]! |= 1 << (p & 7);
    }
  }

  collect(): Promise<Uint32Array> {
    return this.#state.collecting(async () => {
      const taken = this.#bitmap;
      this.#bitmap = new Uint8Array(taken.length);
      return bitmapToPages(taken, this.pageCount);
    });
  }

  collectFinal(): Promise<Uint32Array> {
    return this.collect();
  }

  async stop(): Promise<void> {
    this.#state.beginStop();
  }

  #orBitmap(bytes: Uint8Array, firstPage: number): void {
    const map = this.#bitmap;
    if (firstPage % 8 === 0) {
      const base = firstPage >>> 3;
      for (let i = 0; i < bytes.length; i++) {
        const b = bytes[i]!;
        if (b === 0) continue;
        if (base + i >= map.length) throw invalidArgument(`bitmap marks pages beyond the region's ${this.pageCount} pages`);
        map[base + i]! |= b;
      }
    } else {
      for (let i = 0; i < bytes.length; i++) {
        const b = bytes[i]!;
        if (b === 0) continue;
        for (let j = 0; j < 8; j++) {
          if (!(b & (1 << j))) continue;
          const p = firstPage + i * 8 + j;
          if (p >= this.pageCount) throw invalidArgument(`bitmap marks page ${p}, beyond the region's ${this.pageCount} pages`);
          map[p >>> 3]! |= 1 << (p & 7);
        }
      }
    }
    // bits past pageCount in the last byte are ignored
    const tail = this.pageCount % 8;
    if (tail !== 0) map[map.length - 1]! &= (1 << tail) - 1;
  }
}

/** Ascending indices of the set bits, skipping zero words quickly. */
export function bitmapToPages(bitmap: Uint8Array, pageCount: number): Uint32Array {
  let count = 0;
  for (let i = 0; i < bitmap.length; i++) {
    let b = bitmap[i]!;
    while (b) {
      b &= b - 1;
      count++;
    }
  }
  const out = new Uint32Array(count);
  let n = 0;
  for (let i = 0; i < bitmap.length; i++) {
    const b = bitmap[i]!;
    if (b === 0) continue;
    for (let j = 0; j < 8; j++) {
      if (b & (1 << j)) {
        const p = i * 8 + j;
        if (p < pageCount) out[n++] = p;
      }
    }
  }
  return n === count ? out : out.subarray(0, n);
}
