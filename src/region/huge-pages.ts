/**
 * Huge pages under a region: hugetlbfs (a memfd with MFD_HUGETLB, pages reserved from the
 * host's pool, vm.nr_hugepages) or shmem transparent huge pages (a plain memfd whose mapping is
 * advised MADV_HUGEPAGE, which the kernel honours only where
 * /sys/kernel/mm/transparent_hugepage/shmem_enabled lets it). The wire keeps 4 KiB pages either
 * way; what changes is the backing: fewer faults and TLB entries, and for hugetlbfs a write
 * tracked per huge page (docs/ARCHITECTURE.md, "Huge pages").
 */
import { readFileSync } from 'node:fs';
import { LivemigError, invalidArgument } from '../errors.js';
import { PAGE_SIZE } from '../protocol/format.js';

export const HUGE_PAGE_MODES = ['none', 'thp', 'hugetlb'] as const;
/** What a region asks for at its creation: 4 KiB shmem, shmem THP, or hugetlbfs. */
export type HugePages = (typeof HUGE_PAGE_MODES)[number];

/** The x86-64 PMD size: the huge page size THP uses and hugetlbfs's default. */
export const HUGE_PAGE_SIZE = 2 * 1024 * 1024;

/**
 * What a region's memory is: `shmem` (4 KiB pages), `shmem-thp` (shmem whose mapping may hold
 * 2 MiB pages), `hugetlb` (hugetlbfs pages of `pageSize`), or `mixed` (regions of a guest that
 * differ). `pageSize` is the backing's page size (4 KiB for shmem and mixed).
 */
export interface RegionBacking {
  kind: 'shmem' | 'shmem-thp' | 'hugetlb' | 'mixed';
  pageSize: number;
}

export const SHMEM_BACKING: RegionBacking = { kind: 'shmem', pageSize: PAGE_SIZE };

export function checkHugePages(mode: unknown, what = 'hugePages'): HugePages {
  if (typeof mode !== 'string' || !(HUGE_PAGE_MODES as readonly string[]).includes(mode)) {
    throw invalidArgument(`${what} must be one of ${HUGE_PAGE_MODES.join(', ')}, got ${String(mode)}`);
  }
  return mode as HugePages;
}

/** The host's shmem THP policy (the bracketed word of shmem_enabled), or undefined where unreadable. */
export function shmemThpPolicy(): string | undefined {
  try {
    return /\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/shmem_enabled', 'utf8'))?.[1];
  } catch {
    return undefined; // a kernel without THP: the caller says so
  }
}

/** Whether MADV_HUGEPAGE on a shmem mapping gets huge pages here. */
export function shmemThpAllowed(policy = shmemThpPolicy()): boolean {
  return policy === 'advise' || policy === 'always' || policy === 'within_size' || policy === 'force';
}

/** Refuses THP where the kernel would quietly give 4 KiB pages: the caller asked for huge ones. */
export function assertShmemThpAllowed(): void {
  const policy = shmemThpPolicy();
  if (shmemThpAllowed(policy)) return;
  throw new LivemigError(
    'ERR_LIVEMIG_UNSUPPORTED',
    policy === undefined
      ? 'shmem transparent huge pages: this kernel has no /sys/kernel/mm/transparent_hugepage/shmem_enabled'
      : `shmem transparent huge pages: /sys/kernel/mm/transparent_hugepage/shmem_enabled is '${policy}' on this host ` +
          "(MADV_HUGEPAGE takes effect with 'advise', 'always' or 'within_size')",
    { phase: 'reserve' },
  );
}

/** The hugetlbfs pool of `pageSize` pages: how many are free (not reserved by anyone). */
export function freeHugePages(pageSize: number): number | undefined {
  try {
    const dir = `/sys/kernel/mm/hugepages/hugepages-${pageSize / 1024}kB`;
    const free = Number(readFileSync(`${dir}/free_hugepages`, 'utf8'));
    const reserved = Number(readFileSync(`${dir}/resv_hugepages`, 'utf8'));
    return Number.isSafeInteger(free) && Number.isSafeInteger(reserved) ? Math.max(0, free - reserved) : undefined;
  } catch {
    return undefined; // no pool of that size here
  }
}

/**
 * Refuses a hugetlbfs region the pool cannot hold, before the kernel is asked: its answer
 * (ENOMEM from mmap) does not say that the pool is the limit.
 */
export function assertHugePagesAvailable(size: number, pageSize: number): void {
  if (size % pageSize !== 0) throw invalidArgument(`a hugetlbfs region's size must be a multiple of its page size (${pageSize}), got ${size}`);
  const free = freeHugePages(pageSize);
  const what = `${size / pageSize} huge pages of ${pageSize / 1024} KiB`;
  if (free === undefined) {
    throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `cannot reserve ${what}: this host has no hugetlbfs pool of that page size`, { phase: 'reserve' });
  }
  if (size / pageSize > free) {
    throw new LivemigError(
      'ERR_LIVEMIG_NO_MEMORY',
      `cannot reserve ${what}: the hugetlbfs pool has ${free} free (raise /proc/sys/vm/nr_hugepages, or ` +
        `/sys/kernel/mm/hugepages/hugepages-${pageSize / 1024}kB/nr_hugepages)`,
      { phase: 'reserve' },
    );
  }
}

/**
 * Whether the mapping at `address` in process `pid` may hold shmem transparent huge pages
 * (its smaps entry says THPeligible 1): a guest's memfd says nothing of it, its mapping does.
 */
export function mappingIsThpEligible(pid: number, address: bigint): boolean {
  let smaps: string;
  try {
    smaps = readFileSync(`/proc/${pid === 0 ? 'self' : pid}/smaps`, 'utf8');
  } catch {
    return false; // gone, or not ours to read: the report then says shmem, which tracking does not depend on
  }
  const head = `${address.toString(16)}-`;
  const at = smaps.startsWith(head) ? 0 : smaps.indexOf(`\n${head}`);
  if (at < 0) return false;
  const next = smaps.indexOf('\nVmFlags:', at);
  const entry = smaps.slice(at, next < 0 ? undefined : next);
  return /\nTHPeligible:\s+1\b/.test(entry);
}

export interface HugePagesProbe {
  kind: 'hugetlb' | 'thp';
  available: boolean;
  reason: string;
}

/** Whether this host can give a region huge pages now, of each kind, and why (not). */
export function probeHugePages(): HugePagesProbe[] {
  const free = freeHugePages(HUGE_PAGE_SIZE);
  const policy = shmemThpPolicy();
  return [
    {
      kind: 'hugetlb',
      available: (free ?? 0) > 0,
      reason:
        free === undefined
          ? 'no hugetlbfs pool of 2 MiB pages on this kernel'
          : `${free} free 2 MiB pages in the hugetlbfs pool (${(free * HUGE_PAGE_SIZE) / 2 ** 20} MiB; vm.nr_hugepages sets its size)`,
    },
    {
      kind: 'thp',
      available: shmemThpAllowed(policy),
      reason: policy === undefined ? 'no transparent huge pages on this kernel' : `shmem_enabled is '${policy}'`,
    },
  ];
}
