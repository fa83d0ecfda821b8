/**
 * Stage 5, discard: what a failure leaves behind. The source hears why (unless it said so
 * itself), and before activation the region is discarded. In post-copy the guest runs here on
 * whatever pages it has: it stays.
 */
import { removeDiskImages } from '../disk/incoming.js';
import { existsSync } from 'node:fs';
import { keepDiskImages } from '../disk/kept.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import { LivemigError } from '../errors.js';
import { encodeError } from '../protocol/messages.js';
import type { ReceiverContext } from './context.js';
import { markMayBeAskedAbout, refusedBeforeReserving } from './failures.js';

/** Undoes what can be undone; returns the error to throw. */
export async function discard(ctx: ReceiverContext, e: unknown): Promise<LivemigError> {
  const { conn } = ctx;
  const failedIn = ctx.fail();
  const guestRunsHere = failedIn === 'activated' || failedIn === 'postcopy';
  if (!guestRunsHere) ctx.outcome?.settle('fenced');
  const err =
    e instanceof LivemigError
      ? e
      : new LivemigError('ERR_LIVEMIG_ABORTED', `receive failed while ${failedIn}: ${(e as Error).message}`, {
          phase: failedIn,
          cause: e,
        });
  if (failedIn === 'hello') refusedBeforeReserving(err);
  if (ctx.deviceStateSeen && !ctx.sourceSaidWhy && failedIn !== 'postcopy') markMayBeAskedAbout(err);
  // (an ABORT, or a cancel, is the source's own word: it needs no ERROR back)
  const tell = !conn.closed && !ctx.toldSource && err.code !== 'ERR_LIVEMIG_ABORTED' && err.code !== 'ERR_LIVEMIG_CANCELLED' && failedIn !== 'postcopy';
  await conn.finish(tell ? encodeError({ code: err.code, message: err.message, phase: err.phase ?? failedIn }, ctx.version) : undefined);
  if (ctx.faults && failedIn !== 'postcopy') ctx.faults.stop();
  if (ctx.region && !guestRunsHere) {
    ctx.options.onDiscard?.(ctx.memory ?? ctx.region);
    ctx.region.release(); // nothing was activated: the destination copy is discarded
    ctx.memory?.release();
  }
  // and the disk images made for it: none of them ran here
  await ctx.diskWatch?.close();
  if (ctx.disks && !guestRunsHere) {
    const keepMs = ctx.options.disks?.keepMs ?? 0;
    // kept for the guest's next try here, which then sends only what differs (src/disk/kept.ts)
    if (keepMs > 0 && ctx.diskGuest !== undefined) {
      try {
        keepDiskImages(ctx.disks, ctx.diskGuest, keepMs);
      } catch (e) {
        // not kept (a full or read-only directory): removed, as without --keep-disks; the failure being discarded is what the caller hears
        trace('receiver', ReceiverEvent.diskImagesNotKept, { reason: (e as Error).message });
        removeDiskImages(ctx.disks.filter((d) => existsSync(d.path)));
      }
    } else removeDiskImages(ctx.disks);
  }
  return err;
}
