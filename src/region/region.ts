/**
 * Region: a page-aligned shared memory range (a memfd or shm object mapped into this
 * process) and its geometry. Views are zero-copy Buffers over the mapping.
 */
import { constants as bufferConstants } from 'node:buffer';
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { LivemigError, invalidArgument } from '../errors.js';
import { addon, call, callAsync, type NativeRegion } from '../native.js';
import { PAGE_SIZE as WIRE_PAGE_SIZE } from '../protocol/format.js';
import { allPages, checkExtents, extentPages, splitExtents, type PageExtents } from '../pages/extents.js';
import {
  HUGE_PAGE_SIZE,
  SHMEM_BACKING,
  assertHugePagesAvailable,
  assertShmemThpAllowed,
  checkHugePages,
  type HugePages,
  type RegionBacking,
} from './huge-pages.js';

/** The page size of every region: the wire's (the addon refuses to load on other hosts). */
export const PAGE_SIZE: number = WIRE_PAGE_SIZE;

/** Largest region accepted: page indices travel as u32. */
/** below this many pages a populate is one call: a pool thread's start costs more than it saves */
const POPULATE_SPLIT_PAGES = 16384;

export const MAX_REGION_BYTES = 2 ** 32 * PAGE_SIZE;

export interface CreateRegionOptions {
  /** Name shown in /proc/PID/maps and fd listings (memfd name). */
  name?: string;
  /** Allocate every page now (fallocate) so a lack of memory fails here, not later. */
  reserve?: boolean;
  /** Map every page now (MADV_POPULATE_WRITE) so first writes run at memory speed. */
  populate?: boolean;
  /** The backing's pages (default 'none': 4 KiB shmem); see src/region/huge-pages.ts. */
  hugePages?: HugePages;
  /** hugetlb: the huge page size (default 2 MiB; a size the host has a pool of) */
  hugePageSize?: number;
}

function checkSize(size: unknown, what: string): number {
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
    throw invalidArgument(`${what} must be a positive integer number of bytes, got ${String(size)}`);
  }
  if (size % PAGE_SIZE !== 0) {
    throw invalidArgument(`${what} must be a multiple of the page size (${PAGE_SIZE}), got ${size}`);
  }
  if (size > MAX_REGION_BYTES) throw invalidArgument(`${what} must be at most ${MAX_REGION_BYTES} bytes, got ${size}`);
  return size;
}

/**
 * Refuses a reservation the host cannot hold before asking the kernel: filling a memfd past
 * the available memory would wake the OOM killer rather than fail cleanly.
 */
function assertMemoryAvailable(size: number): void {
  let available: number | undefined;
  try {
    const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
    if (m) available = Number(m[1]) * 1024;
  } catch {
    available = undefined; // no /proc/meminfo (unusual container): let fallocate decide
  }
  if (available !== undefined && size > available) {
    throw new LivemigError('ERR_LIVEMIG_NO_MEMORY', `cannot reserve ${size} bytes: only ${available} bytes of memory are available on this host`, {
      phase: 'reserve',
    });
  }
}

/** The backing of the files a region maps: what each one's filesystem says (hugetlbfs or not). */
function backingOfFiles(pieces: readonly { fd: number; offset: number; size: number }[]): RegionBacking {
  const kinds = pieces.map((p, i): RegionBacking => {
    const b = call('ERR_LIVEMIG_SYSCALL', 'region', `inspecting fd ${p.fd}`, () => addon.fileBacking(p.fd));
    if (!b.hugetlb) return SHMEM_BACKING;
    // a huge page is mapped, protected and reported whole: a piece that splits one cannot be tracked
    if (p.offset % b.blockSize !== 0 || p.size % b.blockSize !== 0) {
      throw invalidArgument(`piece ${i} is on hugetlbfs (${b.blockSize}-byte pages): its offset ${p.offset} and size ${p.size} must be multiples of that`);
    }
    return { kind: 'hugetlb', pageSize: b.blockSize };
  });
  const first = kinds[0] ?? SHMEM_BACKING;
  return kinds.every((k) => k.kind === first.kind && k.pageSize === first.pageSize) ? first : { kind: 'mixed', pageSize: PAGE_SIZE };
}

export class Region {
  readonly size: number;
  /** the wire's page: every page index counts these (the backing's pages may be larger: `backing`) */
  readonly pageSize: number = PAGE_SIZE;
  readonly pageCount: number;
  readonly #native: NativeRegion;
  #backing: RegionBacking;

  private constructor(native: NativeRegion, backing: RegionBacking = SHMEM_BACKING) {
    this.#native = native;
    this.size = native.size;
    this.pageCount = native.size / PAGE_SIZE;
    this.#backing = backing;
  }

  /** What the memory is made of, and its page size (4 KiB unless huge). */
  get backing(): RegionBacking {
    return this.#backing;
  }
  /**
   * Whether pages are written through the files rather than the mapping (native/region/file_io.h):
   * 4 KiB shmem; hugetlbfs takes no write(2), and one would give THP shmem 4 KiB pages.
   */
  get writesThroughFile(): boolean {
    return this.#backing.kind === 'shmem';
  }
  /**
   * From now on a receiver's pages land in the mapping, not the files: for a region populated
   * for write (populateAsync(true)), where that skips a copy and a syscall per run of pages.
   */
  writeInPlace(): void {
    this.#assertLive('writeInPlace');
    addon.regionWriteInPlace(this.#native, true);
  }
  /** Whether the backing's pages are larger than the wire's. */
  get huge(): boolean {
    return this.#backing.pageSize > PAGE_SIZE;
  }

  /**
   * Records that the shmem under this region is mapped for transparent huge pages by the process
   * that writes it (a guest's mapping, which its memfd says nothing about).
   */
  noteTransparentHugePages(): void {
    if (this.#backing.kind === 'shmem') this.#backing = { kind: 'shmem-thp', pageSize: HUGE_PAGE_SIZE };
  }

  /** A new memfd-backed region of `size` bytes (page-aligned), zero-filled. */
  static create(size: number, options: CreateRegionOptions = {}): Region {
    checkSize(size, 'size');
    const name = options.name ?? 'livemig-region';
    if (typeof name !== 'string' || name.length === 0 || name.length > 240) {
      throw invalidArgument('name must be a non-empty string of at most 240 characters');
    }
    const huge = checkHugePages(options.hugePages ?? 'none');
    const hugePageSize = huge === 'hugetlb' ? (options.hugePageSize ?? HUGE_PAGE_SIZE) : 0;
    if (huge === 'hugetlb') assertHugePagesAvailable(size, hugePageSize);
    else if (options.reserve) assertMemoryAvailable(size);
    if (huge === 'thp') assertShmemThpAllowed();
    const backing: RegionBacking =
      huge === 'hugetlb' ? { kind: 'hugetlb', pageSize: hugePageSize } : huge === 'thp' ? { kind: 'shmem-thp', pageSize: HUGE_PAGE_SIZE } : SHMEM_BACKING;
    const region = new Region(
      call('ERR_LIVEMIG_NO_MEMORY', 'region', `creating a ${size}-byte ${backing.kind} region`, () =>
        addon.regionCreate(size, name, hugePageSize, huge === 'thp'),
      ),
      backing,
    );
    try {
      if (options.reserve) region.reserve();
      if (options.populate) region.populate();
    } catch (e) {
      region.release();
      throw e;
    }
    return region;
  }

  /**
   * A region whose every page is allocated (as `create` with `reserve`), the allocation done off
   * the calling thread: a receiver's event loop goes on serving while gigabytes are allocated.
   */
  static async createReserved(size: number, options: Omit<CreateRegionOptions, 'reserve' | 'populate'> & { extents?: PageExtents } = {}): Promise<Region> {
    checkSize(size, 'size');
    // the whole size is checked even when only some pages are allocated now: the guest may
    // write every page once it runs here (hugetlbfs: Region.create checks the pool instead)
    if ((options.hugePages ?? 'none') !== 'hugetlb') assertMemoryAvailable(size);
    const { extents, ...createOptions } = options;
    if (extents) checkExtents(extents, size / PAGE_SIZE);
    const region = Region.create(size, createOptions);
    try {
      const bytes = extents ? extentPages(extents) * PAGE_SIZE : size;
      await callAsync('ERR_LIVEMIG_NO_MEMORY', 'reserve', `reserving ${bytes} bytes`, () => region.#native.reserveAsync(extents));
    } catch (e) {
      region.release();
      throw e;
    }
    return region;
  }

  /**
   * Maps an existing memfd or shm descriptor of at least `size` bytes. The descriptor is
   * duplicated: the caller still owns (and may close) `fd`.
   */
  static adopt(fd: number, size: number): Region {
    if (!Number.isInteger(fd) || fd < 0) throw invalidArgument(`fd must be a non-negative integer, got ${String(fd)}`);
    checkSize(size, 'size');
    return new Region(
      call('ERR_LIVEMIG_SYSCALL', 'region', `adopting fd ${fd}`, () => addon.regionAdopt(fd, size)),
      backingOfFiles([{ fd, offset: 0, size }]),
    );
  }

  /**
   * One region over several files (a guest's regions): each piece's bytes [offset, offset+size)
   * of its descriptor, mapped back to back in this order. The descriptors are duplicated.
   */
  static adoptPieces(pieces: readonly { fd: number; offset: number; size: number }[]): Region {
    if (!Array.isArray(pieces) || pieces.length === 0) throw invalidArgument('pieces must be a non-empty list');
    let total = 0;
    for (const [i, p] of pieces.entries()) {
      if (!Number.isInteger(p.fd) || p.fd < 0) throw invalidArgument(`piece ${i}: fd must be a non-negative integer, got ${String(p.fd)}`);
      if (!Number.isSafeInteger(p.offset) || p.offset < 0 || p.offset % PAGE_SIZE !== 0)
        throw invalidArgument(`piece ${i}: offset must be page-aligned, got ${String(p.offset)}`);
      checkSize(p.size, `piece ${i}'s size`);
      total += p.size;
    }
    checkSize(total, 'the pieces together');
    if (pieces.length === 1 && pieces[0]!.offset === 0) return Region.adopt(pieces[0]!.fd, pieces[0]!.size);
    return new Region(
      call('ERR_LIVEMIG_SYSCALL', 'region', `mapping ${pieces.length} pieces`, () => addon.regionAdoptPieces(pieces.map((p) => ({ ...p })))),
      backingOfFiles(pieces),
    );
  }

  /**
   * The same mapping, from a worker thread of this process: pass `region.shareId` to the
   * worker and call `Region.attach(id)` there. Writes through it are tracked like the owner's.
   */
  static attach(shareId: bigint): Region {
    if (typeof shareId !== 'bigint') throw invalidArgument('shareId must be a bigint from region.shareId');
    const n = call('ERR_LIVEMIG_SYSCALL', 'region', 'attaching to a shared region', () => addon.regionAttach(shareId));
    if (!n) throw new LivemigError('ERR_LIVEMIG_RELEASED', `no live region has share id ${shareId}`, { phase: 'region' });
    return new Region(n);
  }

  get released(): boolean {
    return this.#native.released;
  }
  /** The files this region maps, in order: one, or a guest's regions' (its own descriptors, valid until release). */
  pieces(): { fd: number; offset: number; size: number }[] {
    this.#assertLive('pieces');
    return addon.regionPieces(this.#native);
  }

  get fd(): number {
    this.#assertLive('fd');
    return this.#native.fd;
  }
  /** Start address of the mapping in this process (for tracking and diagnostics). */
  get address(): bigint {
    this.#assertLive('address');
    return this.#native.address;
  }
  get shareId(): bigint {
    this.#assertLive('shareId');
    return this.#native.id;
  }
  /** @internal the native handle, for native page operations */
  get nativeHandle(): NativeRegion {
    this.#assertLive('nativeHandle');
    return this.#native;
  }

  /**
   * A zero-copy Buffer over [offset, offset+length). Default: the whole region (or the first
   * buffer.constants.MAX_LENGTH bytes of a larger one). A view stays safe to touch after
   * release() (it then sees scratch memory), but no longer shows the region.
   */
  view(offset = 0, length?: number): Buffer {
    this.#assertLive('view');
    const len = length ?? Math.min(this.size - offset, bufferConstants.MAX_LENGTH);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset > this.size) {
      throw invalidArgument(`offset must be an integer within the region (0..${this.size}), got ${offset}`);
    }
    if (!Number.isSafeInteger(len) || len < 0 || len > this.size - offset) {
      throw invalidArgument(`length must be an integer with offset+length <= ${this.size}, got ${len}`);
    }
    if (len > bufferConstants.MAX_LENGTH) throw invalidArgument(`length must be at most ${bufferConstants.MAX_LENGTH} (Buffer limit)`);
    return call('ERR_LIVEMIG_SYSCALL', 'region', 'view', () => this.#native.view(offset, len));
  }

  /** A view of one page. */
  page(index: number): Buffer {
    if (!Number.isInteger(index) || index < 0 || index >= this.pageCount) {
      throw invalidArgument(`page index must be an integer in 0..${this.pageCount - 1}, got ${index}`);
    }
    return this.view(index * PAGE_SIZE, PAGE_SIZE);
  }

  /** Allocates all backing memory now; fails with ERR_LIVEMIG_NO_MEMORY if it cannot. */
  reserve(): void {
    this.#assertLive('reserve');
    call('ERR_LIVEMIG_NO_MEMORY', 'reserve', `reserving ${this.size} bytes`, () => this.#native.reserve());
  }

  /** Allocates the pages of `extents` in the backing file now, off the calling thread (a hole there would read as zero). */
  async allocate(extents: PageExtents): Promise<void> {
    this.#assertLive('allocate');
    checkExtents(extents, this.pageCount);
    return callAsync('ERR_LIVEMIG_NO_MEMORY', 'reserve', `allocating ${extentPages(extents) * PAGE_SIZE} bytes`, () => this.#native.reserveAsync(extents));
  }

  /** Faults every page into this process's page tables. */
  populate(): void {
    this.#assertLive('populate');
    call('ERR_LIVEMIG_NO_MEMORY', 'reserve', `populating ${this.size} bytes`, () => this.#native.populate());
  }

  /**
   * The same off the main thread: `forWrite` false for a sender about to read, true for a
   * receiver about to write. Either allocates a page the file does not hold yet (a read fault
   * on a shared memfd's hole allocates it too): pass `extents` (from dataExtents()) to populate
   * only those pages.
   */
  async populateAsync(forWrite = true, extents?: PageExtents): Promise<void> {
    this.#assertLive('populateAsync');
    const what = `populating ${extents ? extentPages(extents) * PAGE_SIZE : this.size} bytes`;
    // a first touch of memory the host took back is slow (ms per MiB on some days): one
    // piece per core, each on a pool thread
    const whole = extents ?? allPages(this.pageCount);
    const pieces = extentPages(whole) >= POPULATE_SPLIT_PAGES ? splitExtents(whole, availableParallelism()) : [whole];
    await Promise.all(pieces.map((p) => callAsync('ERR_LIVEMIG_NO_MEMORY', 'reserve', what, () => this.#native.populateAsync(forWrite, p))));
  }

  /**
   * Where the backing files hold data, as page extents: asked of the files (SEEK_DATA), so no
   * page is read, mapped or allocated. The rest is holes, which read as zero. `within`: only
   * inside those runs (a few holes re-checked costs far less than the whole region); `now`: on
   * the calling thread (inside a guest's pause).
   */
  dataExtents(o: { within?: PageExtents; now?: boolean } = {}): Promise<PageExtents> {
    this.#assertLive('dataExtents');
    return callAsync('ERR_LIVEMIG_SYSCALL', 'region', 'finding where the region holds data', () => this.#native.dataExtentsAsync(o.within, o.now));
  }

  /** Unmaps and closes. Idempotent. Later calls on this region throw ERR_LIVEMIG_RELEASED. */
  release(): void {
    this.#native.release();
  }

  #assertLive(what: string): void {
    if (this.#native.released) throw new LivemigError('ERR_LIVEMIG_RELEASED', `region.${what}: the region has been released`, { phase: 'region' });
  }
}
