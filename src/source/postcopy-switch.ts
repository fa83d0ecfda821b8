/**
 * Stage 3', the switch to post-copy: the priority connection joins and the page server's
 * tables are made before the pause; with the guest paused, the pages the destination lacks
 * are listed and the guest moves at once (src/postcopy/switch.ts); its pages follow, at the
 * push's own cap (none by default).
 */
import { resolveLostCommitment } from './resolve.js';
import { mergePages } from '../precopy/batches.js';
import { PageServer } from '../postcopy/source.js';
import { attachConnection, runPostcopy } from '../postcopy/switch.js';
import { encodeDeviceState } from '../protocol/messages.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import { now, type SourceContext } from './context.js';
import { dataBeforePause, neededWithoutHoles } from './holes.js';
import { peerError } from './peer.js';
import { noStopAndCopy, type Ending } from './report.js';

export async function switchToPostcopy(ctx: SourceContext): Promise<Ending> {
  const { settings } = ctx;
  const { region } = settings.options;
  const { conn, version, tracker } = ctx.session;
  const link = ctx.session.link!; // the handshake refused post-copy modes without one, and the rounds a switch
  const prio = await attachConnection(link, 'prio');
  const allPages = new Uint8Array(region.pageCount).fill(1);
  const server = new PageServer({ region, needed: allPages, version, round: ctx.round + 1, batchPages: settings.batchPages });
  const dataBefore = settings.mode === 'postcopy' ? await dataBeforePause(ctx) : undefined;
  ctx.enter('stop-and-copy');
  const tPause = now();
  ctx.deadlines.armPause();
  trace('source', SourceEvent.pauseRequestedPostcopy);
  const deviceState = await ctx.pauseGuest().catch((e: unknown) => {
    prio.close();
    throw e;
  });
  // the guest's commitment round trip runs beside the last collection and the encoding below
  ctx.announceCommitment();
  let needed: Uint8Array = allPages;
  let pagesNeeded = region.pageCount;
  if (settings.mode !== 'postcopy') {
    const collected = tracker.collectFinal(ctx.hashes);
    const stale = mergePages(ctx.pending, collected instanceof Uint32Array ? collected : await collected);
    needed = new Uint8Array(region.pageCount);
    for (const p of stale) needed[p] = 1;
    pagesNeeded = stale.length;
    server.setNeeded(needed);
  } else {
    const withoutHoles = await neededWithoutHoles(ctx, dataBefore);
    if (withoutHoles) {
      ({ needed, pages: pagesNeeded } = withoutHoles);
      server.setNeeded(needed);
    }
  }
  ctx.live.postcopy({ stats: () => server.stats(), pagesNeeded });
  trace('source', SourceEvent.guestPausedPostcopy);
  // the push has a cap of its own (none by default): pre-copy's cap and rate adaptation end here
  const { control, postcopyBandwidthMiBps } = settings.options;
  ctx.pacer.setRoundLimit(undefined);
  ctx.pacer.setCap(control ? control.enterPostcopy(postcopyBandwidthMiBps) : postcopyBandwidthMiBps);
  let downtime = 0;
  const tPc = now();
  const pc = await runPostcopy({
    server,
    conn,
    deviceState: encodeDeviceState(deviceState, version),
    prio,
    link,
    region,
    needed,
    pagesNeeded,
    hashes: ctx.hashes,
    recoverTimeoutMs: settings.recoverTimeoutMs,
    peerError,
    onCommitting: () => ctx.beginCommitment(),
    confirmTimeoutMs: settings.progressTimeoutMs,
    resolve: (e) => resolveLostCommitment(ctx, e, 'POSTCOPY_RUNNING'),
    onCommitted: () => ctx.enter('activating'),
    onRunning: () => {
      ctx.enter('postcopy');
      downtime = now() - ctx.stoppedAt(tPause);
      trace('source', SourceEvent.postcopyRunningReceived);
      ctx.progress({ type: 'activated', downtime_ms: downtime });
      // tracking is over (the source is paused for good); stopping it is not the guest's pause
      if (settings.mode !== 'postcopy') void tracker.stop().catch(() => undefined);
    },
    onProgress: (st) => ctx.progress({ type: 'postcopy', ...st }),
    // the background push keeps to its cap (requests for faulting pages do not wait)
    pacer: ctx.pacer,
  });
  ctx.enter('done');
  return {
    mode: settings.mode === 'precopy' ? 'hybrid' : settings.mode,
    digest: pc.digest,
    // until the destination held every page (the guest no longer depends on this side)
    totalMs: pc.complete_at - ctx.tFirstPage,
    downtimeMs: downtime,
    stopAndCopy: noStopAndCopy(pc.activate_ms),
    postcopy: { stats: pc.stats, pagesNeeded, postcopyMs: pc.complete_at - tPc, verifyMs: pc.verify_ms, capMiBps: ctx.pacer.limitMiBps },
  };
}
