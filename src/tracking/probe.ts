/**
 * Which tracking backends work on this kernel, why the others do not, and the automatic
 * choice. Each probe exercises the mechanism for real on a small region; a feature bit alone
 * is not trusted.
 */
import { LivemigError } from '../errors.js';
import { addon, closeFd } from '../native.js';
import { Region } from '../region/region.js';
import { ExternalTracker } from './external.js';
import { HashTracker } from './hash.js';
import { SoftDirtyTracker } from './soft-dirty.js';
import type { BackendName, DirtyTracker, RemoteTarget } from './types.js';
import { UffdAsyncTracker, protectOwnRegion, type WriteProtection } from './uffd-async.js';

export interface BackendProbe {
  backend: BackendName;
  available: boolean;
  /** why it works, or exactly why not (errno, missing feature) */
  reason: string;
}

function describe(e: unknown): string {
  if (e instanceof LivemigError) return e.errnoName ? `${e.syscall ?? 'call'} failed with ${e.errnoName}: ${e.message}` : e.message;
  return String(e);
}

function probeUffdAsync(): BackendProbe {
  const backend = 'uffd-async';
  let features: bigint;
  try {
    features = addon.uffdProbe();
  } catch (e) {
    const n = e as { errnoName?: string; syscall?: string };
    return { backend, available: false, reason: `userfaultfd unavailable: ${n.syscall ?? 'userfaultfd'} failed with ${n.errnoName ?? String(e)}` };
  }
  if (!(features & addon.UFFD_FEATURE_WP_ASYNC)) {
    return { backend, available: false, reason: `userfaultfd lacks UFFD_FEATURE_WP_ASYNC (features 0x${features.toString(16)}; Linux >= 6.7 needed)` };
  }
  const region = Region.create(4 * addon.pageSize(), { name: 'livemig-probe' });
  let protection: WriteProtection | undefined;
  let pagemap = -1;
  try {
    region.view().fill(1);
    protection = protectOwnRegion(region);
    pagemap = addon.pagemapOpen(0);
    const scan = () => addon.pagemapScanSync(pagemap, region.address, region.size, region.pageSize, true);
    const before = scan();
    region.page(2)[0] = 7;
    const after = scan();
    if (before.length !== 0 || after.length !== 1 || after[0] !== 2) {
      return { backend, available: false, reason: `PAGEMAP_SCAN reported pages [${Array.from(after).join(',')}] for one write to page 2` };
    }
    return { backend, available: true, reason: 'userfaultfd WP_ASYNC and PAGEMAP_SCAN work (exact; the kernel resolves write faults itself)' };
  } catch (e) {
    const n = e as { errnoName?: string; syscall?: string };
    return { backend, available: false, reason: n.syscall ? `${n.syscall} failed with ${n.errnoName ?? '?'}` : describe(e) };
  } finally {
    if (pagemap >= 0) closeFd(pagemap, 'probe');
    protection?.close();
    region.release();
  }
}

function probeSoftDirty(): BackendProbe {
  const backend = 'soft-dirty';
  try {
    if (addon.softDirtyProbe()) return { backend, available: true, reason: 'pagemap bit 55 is set after a write that follows clear_refs=4' };
    return {
      backend,
      available: false,
      reason: 'kernel keeps no soft-dirty bits (built without CONFIG_MEM_SOFT_DIRTY): a page written after clear_refs=4 shows no pagemap bit 55',
    };
  } catch (e) {
    const n = e as { errnoName?: string; syscall?: string };
    return { backend, available: false, reason: `${n.syscall ?? 'probe'} failed with ${n.errnoName ?? String(e)}` };
  }
}

let cached: BackendProbe[] | undefined;

/** Every backend, whether it works here and why. Cached after the first call. */
export function probe(): BackendProbe[] {
  cached ??= [
    probeUffdAsync(),
    probeSoftDirty(),
    { backend: 'hash', available: true, reason: 'portable: compares a per-page XXH64 with the previous round (reads the whole region each collect)' },
    { backend: 'external', available: true, reason: 'the integrator reports dirty pages itself through markDirty()' },
  ];
  return cached.map((p) => ({ ...p }));
}

export interface ChooseOptions {
  /** a backend to use instead of the automatic choice */
  backend?: BackendName;
  /** track writes made by another process through its own mapping */
  target?: RemoteTarget;
}

export interface TrackerChoice {
  tracker: DirtyTracker;
  backend: BackendName;
  reason: string;
}

/** Automatic choice: uffd-async, then soft-dirty, then hash. `external` only when asked for. */
export function chooseTracker(region: Region, options: ChooseOptions = {}): TrackerChoice {
  const probes = probe();
  const status = (b: BackendName): BackendProbe => {
    const s = probes.find((p) => p.backend === b)!;
    // clear_refs skips hugetlbfs mappings and their pagemap entries carry no soft-dirty bit:
    // every write there would go unseen
    if (b === 'soft-dirty' && s.available && region.backing.kind === 'hugetlb')
      return {
        ...s,
        available: false,
        reason: 'no soft-dirty bit tells a write on hugetlbfs: clear_refs skips those mappings and their pagemap shows only the mapping-wide flag',
      };
    return s;
  };
  const make = (b: BackendName): DirtyTracker => {
    switch (b) {
      case 'uffd-async':
        return new UffdAsyncTracker(region, options.target);
      case 'soft-dirty':
        return new SoftDirtyTracker(region, options.target);
      case 'hash':
        return new HashTracker(region);
      case 'external':
        return new ExternalTracker(region);
      case 'shared':
        throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', "tracking 'shared' is a same-host upgrade's (migrate with local), not a backend to choose", {
          phase: 'tracking',
        });
    }
  };
  if (options.backend) {
    const s = status(options.backend);
    if (!s.available) {
      throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `tracking backend ${options.backend} is not available here: ${s.reason}`, { phase: 'tracking' });
    }
    return { tracker: make(options.backend), backend: options.backend, reason: `requested; ${s.reason}` };
  }
  const skipped: string[] = [];
  for (const b of ['uffd-async', 'soft-dirty', 'hash'] as const) {
    const s = status(b);
    if (s.available) {
      const why = skipped.length ? `${s.reason}; not chosen: ${skipped.join('; ')}` : s.reason;
      return { tracker: make(b), backend: b, reason: why };
    }
    skipped.push(`${b}: ${s.reason}`);
  }
  throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', 'no tracking backend works here', { phase: 'tracking' });
}
