/**
 * Page extents: runs of pages as a flat Float64Array [first, end, first, end, ...], in order,
 * end exclusive. What a region's backing files say holds data (SEEK_DATA), what a destination
 * allocates before pages arrive, and what HELLO carries as a reservation hint.
 */
import { LivemigError } from '../errors.js';

export type PageExtents = Float64Array;

/** Throws unless `e` is ordered, non-overlapping, non-empty runs inside `pageCount` pages. */
export function checkExtents(e: PageExtents, pageCount: number, phase = 'reserve'): void {
  const bad = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `page extents: ${why}`, { phase });
  if (!(e instanceof Float64Array) || e.length % 2 !== 0) throw bad('a Float64Array of [first, end) pairs');
  let last = 0;
  for (let i = 0; i < e.length; i += 2) {
    const first = e[i]!;
    const end = e[i + 1]!;
    if (!Number.isInteger(first) || !Number.isInteger(end)) throw bad(`pair ${i / 2} is not two integers`);
    if (first < last || end <= first || end > pageCount) throw bad(`pair ${i / 2} [${first}, ${end}) is out of order or outside ${pageCount} pages`);
    last = end;
  }
}

/** How many pages the extents cover. */
export function extentPages(e: PageExtents): number {
  let n = 0;
  for (let i = 0; i < e.length; i += 2) n += e[i + 1]! - e[i]!;
  return n;
}

/** Every page the extents cover, in order. */
export function pagesIn(e: PageExtents): Uint32Array {
  const out = new Uint32Array(extentPages(e));
  let k = 0;
  for (let i = 0; i < e.length; i += 2) for (let p = e[i]!; p < e[i + 1]!; p++) out[k++] = p;
  return out;
}

/** One byte per page: 1 where the extents cover it. */
export function extentMap(e: PageExtents, pageCount: number): Uint8Array {
  const map = new Uint8Array(pageCount);
  for (let i = 0; i < e.length; i += 2) map.fill(1, e[i]!, e[i + 1]!);
  return map;
}

/** The whole region as one extent. */
export function allPages(pageCount: number): PageExtents {
  return Float64Array.of(0, pageCount);
}

/**
 * At most `maxRuns` runs covering at least what `e` covers: runs are joined across their
 * smallest gaps (a reservation hint may take a few pages too many, never too few).
 */
export function coarsen(e: PageExtents, maxRuns: number): PageExtents {
  const runs = e.length / 2;
  if (runs <= maxRuns) return e;
  const gap = (i: number): number => e[2 * i + 2]! - e[2 * i + 1]!;
  // exactly the (runs - maxRuns) smallest gaps are joined (ties by position): joining every gap
  // as small as the last one would join them all when the gaps are equal, and the hint would
  // then reserve the whole region
  const order = Array.from({ length: runs - 1 }, (_, i) => i).sort((a, b) => gap(a) - gap(b) || a - b);
  const joined = new Uint8Array(runs - 1);
  for (const i of order.slice(0, runs - maxRuns)) joined[i] = 1;
  const out: number[] = [e[0]!, e[1]!];
  for (let i = 1; i < runs; i++) {
    if (joined[i - 1]) out[out.length - 1] = e[2 * i + 1]!;
    else out.push(e[2 * i]!, e[2 * i + 1]!);
  }
  return Float64Array.from(out);
}

/** The runs of `pageCount` pages that `e` does not cover. */
export function complement(e: PageExtents, pageCount: number): PageExtents {
  const out: number[] = [];
  let at = 0;
  for (let i = 0; i < e.length; i += 2) {
    if (e[i]! > at) out.push(at, e[i]!);
    at = e[i + 1]!;
  }
  if (at < pageCount) out.push(at, pageCount);
  return Float64Array.from(out);
}

/** Every page either covers, as ordered runs (adjacent ones joined). */
export function union(a: PageExtents, b: PageExtents): PageExtents {
  const runs: [number, number][] = [];
  for (const e of [a, b]) for (let i = 0; i < e.length; i += 2) runs.push([e[i]!, e[i + 1]!]);
  runs.sort((x, y) => x[0] - y[0]);
  const out: number[] = [];
  for (const [f, t] of runs) {
    if (out.length && f <= out[out.length - 1]!) out[out.length - 1] = Math.max(out[out.length - 1]!, t);
    else out.push(f, t);
  }
  return Float64Array.from(out);
}

/**
 * The extents cut into at most `parts` pieces of about as many pages each, in order; each piece
 * a multiple of `align` pages (but the last), so that extents aligned to huge pages stay so.
 */
export function splitExtents(e: PageExtents, parts: number, align = 512): PageExtents[] {
  const total = extentPages(e);
  const per = Math.max(align, Math.ceil(total / Math.max(1, parts) / align) * align);
  const out: PageExtents[] = [];
  let piece: number[] = [];
  let room = per;
  for (let i = 0; i < e.length; i += 2) {
    let first = e[i]!;
    const end = e[i + 1]!;
    while (first < end) {
      const take = Math.min(room, end - first);
      piece.push(first, first + take);
      first += take;
      room -= take;
      if (room === 0) {
        out.push(Float64Array.from(piece));
        piece = [];
        room = per;
      }
    }
  }
  if (piece.length) out.push(Float64Array.from(piece));
  return out;
}

/**
 * The extents as one bit per chunk of `chunkPages` pages (set: the chunk holds a page they
 * cover), at the finest power-of-two chunk whose bitmap fits `maxBytes`, at least `minChunk`.
 */
export function toChunkMap(e: PageExtents, pageCount: number, maxBytes: number, minChunk = 1): { chunkPages: number; bits: Buffer } {
  let chunkPages = minChunk;
  while (Math.ceil(Math.ceil(pageCount / chunkPages) / 8) > maxBytes) chunkPages *= 2;
  const bits = Buffer.alloc(Math.ceil(Math.ceil(pageCount / chunkPages) / 8));
  for (let i = 0; i < e.length; i += 2) {
    const last = Math.floor((e[i + 1]! - 1) / chunkPages);
    for (let c = Math.floor(e[i]! / chunkPages); c <= last; c++) bits[c >> 3]! |= 1 << (c & 7);
  }
  return { chunkPages, bits };
}

/** The pages a chunk map covers, as extents (the last chunk cut at the region's end). */
export function fromChunkMap(chunkPages: number, bits: Uint8Array, pageCount: number): PageExtents {
  const out: number[] = [];
  const chunks = Math.ceil(pageCount / chunkPages);
  for (let c = 0; c < chunks; c++) {
    if (!(bits[c >> 3]! & (1 << (c & 7)))) continue;
    const first = c * chunkPages;
    const end = Math.min(first + chunkPages, pageCount);
    if (out.length && out[out.length - 1] === first) out[out.length - 1] = end;
    else out.push(first, end);
  }
  return Float64Array.from(out);
}
