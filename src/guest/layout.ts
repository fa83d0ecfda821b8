/**
 * A guest's regions in one page space: region i's pages follow region i-1's. livemig maps a
 * guest's regions back to back in this order, tracks, sends, hashes and digests them as one
 * space, and the wire's HELLO carries the table, so both ends agree on which page is where.
 */
import { invalidArgument } from '../errors.js';
import { PAGE_SIZE } from '../protocol/format.js';

/** most regions one guest may have */
export const MAX_GUEST_REGIONS = 32;
/** a region's name: what a VMM calls it ("ram-low", "ram-high", "vram") */
export const REGION_NAME = /^[A-Za-z0-9._-]{1,63}$/;
/** a guest's name (what a daemon lists it by): the same rule */
export const GUEST_NAME = REGION_NAME;

export interface RegionSpec {
  /** unique within the guest, u32 */
  id: number;
  name: string;
  /** bytes, a multiple of the page size */
  size: number;
}

export interface LayoutRegion extends RegionSpec {
  /** the region's first page in the guest's page space */
  firstPage: number;
  pages: number;
}

export class GuestLayout {
  readonly regions: readonly LayoutRegion[];
  readonly pageCount: number;
  readonly bytes: number;

  private constructor(regions: LayoutRegion[]) {
    this.regions = regions;
    this.pageCount = regions.reduce((n, r) => n + r.pages, 0);
    this.bytes = this.pageCount * PAGE_SIZE;
  }

  /** One region of `size` bytes (what a guest with a single region has). */
  static single(size: number, name = 'ram'): GuestLayout {
    return GuestLayout.of([{ id: 0, name, size }]);
  }

  /** The regions in this order; throws a clear error for a table that cannot be one. */
  static of(specs: readonly RegionSpec[], what = 'regions'): GuestLayout {
    return new GuestLayout(checkRegions(specs, what, (why) => invalidArgument(why)));
  }

  /** The same, with the caller's error for what came from the network or a guest. */
  static checked(specs: readonly RegionSpec[], what: string, fail: (why: string) => Error): GuestLayout {
    return new GuestLayout(checkRegions(specs, what, fail));
  }

  /** The index of the region that holds `page`. */
  regionOf(page: number): number {
    let lo = 0;
    let hi = this.regions.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.regions[mid]!.firstPage <= page) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** How many of `pages` (ascending) fall in each region. */
  breakdown(pages: Uint32Array, into: number[] = new Array<number>(this.regions.length).fill(0)): number[] {
    let at = 0;
    for (let r = 0; r < this.regions.length; r++) {
      const end = this.regions[r]!.firstPage + this.regions[r]!.pages;
      const start = at;
      // pages are ascending: the first index past this region, by binary search
      let lo = at;
      let hi = pages.length;
      while (lo < hi) {
        const mid = (lo + hi) >> 1;
        if (pages[mid]! < end) lo = mid + 1;
        else hi = mid;
      }
      at = lo;
      into[r] = (into[r] ?? 0) + (at - start);
    }
    return into;
  }

  /** The table as HELLO carries it. */
  toWire(): RegionSpec[] {
    return this.regions.map((r) => ({ id: r.id, name: r.name, size: r.size }));
  }
}

function checkRegions(specs: readonly RegionSpec[], what: string, fail: (why: string) => Error): LayoutRegion[] {
  if (!Array.isArray(specs) || specs.length === 0 || specs.length > MAX_GUEST_REGIONS) {
    throw fail(`${what}: 1..${MAX_GUEST_REGIONS} regions, got ${Array.isArray(specs) ? specs.length : typeof specs}`);
  }
  const ids = new Set<number>();
  let first = 0;
  const out: LayoutRegion[] = [];
  for (const [i, r] of specs.entries()) {
    if (typeof r !== 'object' || r === null) throw fail(`${what}: region ${i} is not an object`);
    if (!Number.isInteger(r.id) || r.id < 0 || r.id > 0xffffffff) throw fail(`${what}: region ${i}'s id ${String(r.id)} is not a u32`);
    if (ids.has(r.id)) throw fail(`${what}: region id ${r.id} appears twice`);
    ids.add(r.id);
    if (typeof r.name !== 'string' || !REGION_NAME.test(r.name)) throw fail(`${what}: region ${i}'s name must be 1..63 characters of [A-Za-z0-9._-]`);
    if (!Number.isSafeInteger(r.size) || r.size <= 0 || r.size % PAGE_SIZE !== 0)
      throw fail(`${what}: region ${r.name}'s size ${String(r.size)} is not a positive multiple of ${PAGE_SIZE}`);
    const pages = r.size / PAGE_SIZE;
    if (first + pages > 2 ** 32) throw fail(`${what}: the regions hold more than 2^32 pages (page numbers travel as u32)`);
    out.push({ id: r.id, name: r.name, size: r.size, firstPage: first, pages });
    first += pages;
  }
  return out;
}
