/**
 * Stage 3, stop-and-copy: the guest pauses, the tracker's last collect (without re-arming: the
 * guest stays paused until it runs elsewhere or resumes after a failure) and the last dirty
 * pages go from the calling thread.
 */
import { mergePages } from '../precopy/batches.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import { now, type SourceContext } from './context.js';
import { sendRound } from './rounds.js';

export interface StoppedGuest {
  deviceState: Uint8Array;
  lastPages: number;
  lastBytes: number;
  tPause: number;
  /** when the guest stopped running: tPause, or later where the VMM said so (a QEMU VM runs on while its migration sets up) */
  tStopped: number;
  tPaused: number;
  tCollected: number;
  tLastSent: number;
}

export async function stopAndCopy(ctx: SourceContext): Promise<StoppedGuest> {
  const { tracker } = ctx.session;
  ctx.enter('stop-and-copy');
  const tPause = now();
  ctx.deadlines.armPause();
  trace('source', SourceEvent.pauseRequested);
  // the last pages go as soon as the guest writes no more memory, beside the rest of its save
  let halted!: () => void;
  const haltedNow = new Promise<void>((resolve) => (halted = resolve));
  const saving = ctx.pauseGuest(halted);
  saving.catch(() => undefined); // awaited below; a send that fails first is the error told
  await Promise.race([haltedNow, saving]);
  const tPaused = now();
  trace('source', SourceEvent.guestPaused);
  const collected = tracker.collectFinal(ctx.hashes);
  const final = collected instanceof Uint32Array ? collected : await collected;
  const tCollected = now();
  trace('source', SourceEvent.finalCollectDone);
  const lastPages = mergePages(ctx.pending, final);
  ctx.pending = lastPages;
  ctx.pendingSince = ctx.pagesSent;
  const diskBlocksBefore = ctx.diskBlocks.reduce((n, b) => n + b, 0);
  const lastBytes = (await sendRound(ctx, { round: ctx.round + 1, pages: lastPages, final: true })).bytes;
  ctx.finalDiskBlocks = ctx.diskBlocks.reduce((n, b) => n + b, 0) - diskBlocksBefore;
  trace('source', SourceEvent.lastPagesSent);
  const deviceState = await saving;
  return { deviceState, lastPages: lastPages.length, lastBytes, tPause, tStopped: ctx.stoppedAt(tPause), tPaused, tCollected, tLastSent: now() };
}
