// How the source reads a guest's pages: through its own mapping of them, populated while the
// destination reserves, or through the guest's files (native/region/read_path.h). Which is
// cheaper depends on the host, not on livemig: on a host that is itself a VM a first touch
// through a process's mapping has cost an exit to the hypervisor (1.7 us a page, pread then
// cheaper), and on others the mapping reads an all-zero page without copying it (3x cheaper).
// So both are timed on the guest's own pages, each on a sample of its own, and the faster wins.
import { addon, callAsync } from '../native.js';
import { extentPages, type PageExtents } from '../pages/extents.js';
import type { Region } from './region.js';

function median(xs: Float64Array): number {
  const s = Float64Array.from(xs).sort();
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

export interface ReadPath {
  path: 'mapping' | 'files';
  reason: string;
}

/** runs of this many pages, alternately through either path: both see the same moments and content */
const SAMPLE_RUN = 32;
/** runs in all: 16 MiB, a few milliseconds */
const SAMPLE_RUNS = 128;

/** Sample pages from the data extents: SAMPLE_RUNS runs spread evenly over them, in order. */
export function readPathSample(extents: PageExtents): Uint32Array | undefined {
  const total = extentPages(extents);
  if (total < SAMPLE_RUNS * SAMPLE_RUN) return undefined;
  const out = new Uint32Array(SAMPLE_RUNS * SAMPLE_RUN);
  const stride = Math.floor(total / SAMPLE_RUNS);
  let n = 0;
  for (let r = 0; r < SAMPLE_RUNS; r++) {
    // the run starts r strides into the data; a run that crosses an extent's end goes on in the next
    let skip = r * stride;
    let left = SAMPLE_RUN;
    for (let e = 0; e < extents.length && left > 0; e += 2) {
      const len = extents[e + 1]! - extents[e]!;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      for (let p = extents[e]! + skip; p < extents[e + 1]! && left > 0; p++, left--) out[n++] = p;
      skip = 0;
    }
  }
  return out.subarray(0, n);
}

/**
 * Chooses the read path for a region already populated over `extents` (only where its files
 * hold data: the mapping is never read where they do not) and sets it. Small guests and those
 * read through the mapping anyway stay on the files.
 */
export async function chooseReadPath(region: Region, extents: PageExtents, asked: 'auto' | 'mapping' | 'files' = 'auto'): Promise<ReadPath> {
  if (asked !== 'auto') {
    addon.regionReadInPlace(region.nativeHandle, asked === 'mapping');
    return { path: asked, reason: 'asked for' };
  }
  const sample = readPathSample(extents);
  if (!sample) return { path: 'files', reason: 'too few pages to time both paths' };
  const runs = await callAsync('ERR_LIVEMIG_SYSCALL', 'region', 'timing the read paths', () =>
    addon.compareReadPathsAsync(region.nativeHandle, sample, SAMPLE_RUN),
  );
  const mappedNs = median(runs.filter((_, i) => i % 2 === 0));
  const filesNs = median(runs.filter((_, i) => i % 2 === 1));
  const perPage = (ns: number): string => `${(ns / 1e3 / SAMPLE_RUN).toFixed(2)} us a page`;
  const timed =
    `medians of ${SAMPLE_RUNS / 2} runs of ${SAMPLE_RUN} pages each way: ` + `through the mapping ${perPage(mappedNs)}, through the files ${perPage(filesNs)}`;
  const mapping = mappedNs <= filesNs;
  addon.regionReadInPlace(region.nativeHandle, mapping);
  return { path: mapping ? 'mapping' : 'files', reason: timed };
}
