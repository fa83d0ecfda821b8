/**
 * The host's huge page settings for a test or benchmark run: the hugetlbfs pool
 * (/proc/sys/vm/nr_hugepages, 2 MiB pages) raised for the run and the shmem THP policy switched
 * to `advise`, each put back as it was afterwards. Writing them needs root; where that fails
 * the caller gets the reason to skip with.
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { HUGE_PAGE_SIZE, freeHugePages, shmemThpPolicy } from '../src/region/huge-pages.js';

const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';
const SHMEM_ENABLED = '/sys/kernel/mm/transparent_hugepage/shmem_enabled';

export interface HostSetting {
  /** undefined when the setting is in place; else why it could not be */
  skip?: string;
  restore(): void;
}

/** The meminfo line `name` in kB (or pages, for the HugePages_ counters). */
export function meminfo(name: string): number {
  const m = new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) : Number.NaN;
}

/**
 * At least `bytes` of free 2 MiB hugetlbfs pages, raising the pool by what is missing. The
 * kernel may grant fewer pages than asked (fragmented memory): that is a skip, with the count.
 */
export function reserveHugePages(bytes: number): HostSetting {
  const want = Math.ceil(bytes / HUGE_PAGE_SIZE);
  let old: string;
  try {
    old = readFileSync(NR_HUGEPAGES, 'utf8').trim();
  } catch (e) {
    return { skip: `cannot read ${NR_HUGEPAGES}: ${(e as Error).message}`, restore: () => undefined };
  }
  const free = freeHugePages(HUGE_PAGE_SIZE) ?? 0;
  if (free >= want) return { restore: () => undefined };
  const restore = (): void => writeFileSync(NR_HUGEPAGES, old);
  try {
    writeFileSync(NR_HUGEPAGES, String(Number(old) + want - free));
  } catch (e) {
    return { skip: `cannot raise ${NR_HUGEPAGES} (root needed): ${(e as Error).message}`, restore: () => undefined };
  }
  const got = freeHugePages(HUGE_PAGE_SIZE) ?? 0;
  if (got < want) {
    restore();
    return { skip: `asked the kernel for ${want} free 2 MiB huge pages, it has ${got} (memory too fragmented or too small)`, restore: () => undefined };
  }
  return { restore };
}

/** shmem THP for advised mappings: `advise` unless the policy already gives huge pages. */
export function allowShmemThp(): HostSetting {
  const policy = shmemThpPolicy();
  if (policy === undefined) return { skip: `this kernel has no ${SHMEM_ENABLED} (no transparent huge pages)`, restore: () => undefined };
  if (policy === 'advise' || policy === 'always' || policy === 'within_size' || policy === 'force') return { restore: () => undefined };
  try {
    writeFileSync(SHMEM_ENABLED, 'advise');
  } catch (e) {
    return { skip: `shmem_enabled is '${policy}' and cannot be set to advise (root needed): ${(e as Error).message}`, restore: () => undefined };
  }
  return { restore: () => writeFileSync(SHMEM_ENABLED, policy) };
}

/** where the host's lock lives: one directory, made atomically by whoever holds it */
const LOCK = path.join(os.tmpdir(), 'livemig-huge-host.lock');

/**
 * Waits until this process holds the host's huge page lock (a directory made atomically, its
 * owner's pid inside; one left by a process that died is taken over), and returns its release.
 */
export async function lockHost(): Promise<() => void> {
  for (;;) {
    try {
      mkdirSync(LOCK);
      writeFileSync(path.join(LOCK, 'pid'), String(process.pid));
      return () => rmSync(LOCK, { recursive: true, force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const owner = lockOwner();
    if (owner > 0 && !alive(owner)) rmSync(LOCK, { recursive: true, force: true });
    else await new Promise((r) => setTimeout(r, 100));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** the lock's owner, or 0 while it is being made or removed (look again) */
function lockOwner(): number {
  try {
    return Number(readFileSync(path.join(LOCK, 'pid'), 'utf8'));
  } catch {
    return 0;
  }
}
