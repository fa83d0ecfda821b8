/**
 * Pages the guest's memory holds no data for (holes of its memfds, SEEK_DATA) read as zero,
 * and a destination that offered `holes` starts as zeros: such a page is never read here (a
 * read of a hole would allocate it on this host) nor sent. Asked of the files after tracking
 * is armed, so a hole the guest writes later is dirty like any page and goes in a later round.
 */
import { addon, call } from '../native.js';
import { complement, extentMap, extentPages, pagesIn, union, type PageExtents } from '../pages/extents.js';
import { mergePages } from '../precopy/batches.js';
import { CAP_HOLES } from '../protocol/format.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import type { SourceContext } from './context.js';

function holesAgreed(ctx: SourceContext): boolean {
  return !ctx.settings.options.local && ctx.session.accept.capabilities.includes(CAP_HOLES);
}

/** Every page's hash starts as the zero page's, as the destination's do: a hole's stays so. */
function startFromZero(ctx: SourceContext): void {
  ctx.hashes.fill(call('ERR_LIVEMIG_SYSCALL', 'precopy', 'the zero page hash', () => addon.zeroPageHash()));
}

/** Before the first pass (tracking armed): only the pages that hold data are due. */
export async function skipHoles(ctx: SourceContext): Promise<void> {
  if (!holesAgreed(ctx)) return;
  const { region } = ctx.settings.options;
  const data = await region.dataExtents();
  startFromZero(ctx);
  ctx.pending = pagesIn(data);
  // a hole here over a page the destination holds something else in (a kept image) is sent: as zeros
  const there = ctx.destinationHashes;
  if (there) {
    const zero = ctx.hashes[0]!;
    const stale: number[] = [];
    const holes = complement(data, region.pageCount);
    for (let i = 0; i < holes.length; i += 2) for (let p = holes[i]!; p < holes[i + 1]!; p++) if (there[p] !== zero) stale.push(p);
    if (stale.length) ctx.pending = mergePages(ctx.pending, Uint32Array.from(stale));
  }
  ctx.holePages = region.pageCount - ctx.pending.length;
  trace('source', SourceEvent.holesSkipped, { pages: ctx.holePages });
}

/**
 * Post-copy from the start, before the pause: where the guest's data is now (undefined when
 * holes were not agreed). The pause then re-checks only the holes (neededWithoutHoles): a scan
 * of a whole populated gigabyte walks every page of the file, ~30 ms measured, too long there.
 */
export async function dataBeforePause(ctx: SourceContext): Promise<PageExtents | undefined> {
  return holesAgreed(ctx) ? ctx.settings.options.region.dataExtents() : undefined;
}

/**
 * With the guest paused (so the answer is exact): one byte per page, 1 where the destination
 * needs the page from here (undefined: every page): the data found before the pause, and whatever the guest wrote into
 * a hole since. (Its hashes need no zero start: post-copy hashes the whole paused image at the end.)
 */
export async function neededWithoutHoles(ctx: SourceContext, before: PageExtents | undefined): Promise<{ needed: Uint8Array; pages: number } | undefined> {
  if (!before) return undefined;
  const { region } = ctx.settings.options;
  const holes = complement(before, region.pageCount);
  const data = holes.length ? union(before, await region.dataExtents({ within: holes, now: true })) : before;
  const pages = extentPages(data);
  ctx.holePages = region.pageCount - pages;
  trace('source', SourceEvent.holesSkipped, { pages: ctx.holePages });
  // no hole: every page is needed, as the page server was made (a new table of a gigabyte's
  // pages, and the server's reset for it, cost 2-5 ms of the pause for nothing)
  if (pages === region.pageCount) return undefined;
  return { needed: extentMap(data, region.pageCount), pages };
}
