/**
 * Stage 2, pre-copy rounds: send what is due, collect what the guest dirtied meanwhile, let the
 * policy decide (go on, stop, throttle, switch to post-copy, give up). Ends with the destination
 * caught up on everything sent, so that the pause does not pay for its backlog.
 */
import { FIXED_STOP_COST_MS } from '../precopy/policy.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import { LivemigError } from '../errors.js';
import { firstOutOfOrder, mergePages } from '../precopy/batches.js';
import { ConvergencePolicy, type Decision } from '../precopy/policy.js';
import { WritableWorkingSet } from '../precopy/wws.js';
import { FrameType } from '../protocol/format.js';
import { decodeRoundAck, encodeRoundEnd, type RoundEnd } from '../protocol/messages.js';
import { FAST_LINK_MBPS, LINK_WINDOW, type LinkFigure } from '../encoding/chooser.js';
import type { RoundPages } from '../encoding/encoder.js';
import { now, type SourceContext } from './context.js';
import { skipHoles } from './holes.js';
import { peerError } from './peer.js';
import type { RoundStats } from './types.js';

/**
 * Longest a round after the first runs, with the throttle stall policy, before the rest of its
 * pages wait for the next: through 1 Gbit/s a pass over 1 GiB takes ~9 s, and a policy that
 * acts once a round would step the throttle once every 9 s while the guest dirties the region
 * again.
 */
const ROUND_BUDGET_MS = 1000;

/** How pre-copy ended: stop and copy, or switch to post-copy. */
export type PrecopyOutcome = 'stop-and-copy' | 'postcopy';

export async function runRounds(ctx: SourceContext): Promise<PrecopyOutcome> {
  const { settings } = ctx;
  const { options } = settings;
  const { region } = options;
  const { conn, version, tracker, link } = ctx.session;
  // Arm tracking before the first page is read: a write after this is caught by a later round.
  // (post-copy from the start has no rounds: nothing to track)
  if (settings.mode !== 'postcopy') await tracker.start().then(() => skipHoles(ctx));
  ctx.live.rearmed();
  ctx.enter('precopy');
  ctx.deadlines.watchProgress();
  ctx.tFirstPage = now();
  if (settings.mode === 'postcopy') return 'postcopy';
  const policy = convergencePolicy(ctx);
  const wws = options.wws === false ? undefined : new WritableWorkingSet(region.pageCount);
  const ra = options.rateAdaptation;
  let outcome: PrecopyOutcome | undefined;
  // rounds run only while the destination's disks catch up count toward no round limit
  let diskWaitRounds = 0;
  for (let round = 1; outcome === undefined; round++) {
    ctx.round = round;
    const t0 = now();
    // after the first pass (which must send everything anyway), a round expected to take
    // longer than ROUND_BUDGET_MS is cut there, for the throttle's sake. Only then: the other
    // stall actions judge a round by how far it shrank what is left, which a cut round does
    // not show (a guest that would converge over whole rounds would be forced, moved or given up)
    const knownMbps = round > 1 && settings.onStall === 'throttle' ? ctx.pacer.achievedMbps() : undefined;
    const long = knownMbps !== undefined && (ctx.pending.length * region.pageSize) / 1e3 / knownMbps > ROUND_BUDGET_MS;
    trace('source', SourceEvent.roundBegins, { round });
    ctx.pendingSince = ctx.pagesSent;
    if (options.control?.downtimeLimitMs !== undefined) policy.options.downtimeLimitMs = options.control.downtimeLimitMs;
    const { bytes, unsent, busyMs } = await sendRound(ctx, { round, pages: ctx.pending, ...(long ? { budgetMs: ROUND_BUDGET_MS } : {}) });
    const sentPages = ctx.pending.length - unsent.length;
    await Promise.all([conn.send(encodeRoundEnd({ round, pages: sentPages }, version)), ctx.session.channels.endRound(round, version)]);
    const duration = now() - t0;
    const { dirty, collectMs } = await collectRound(ctx, wws);
    const due = unsent.length > 0 ? mergePages(dirty, unsent) : dirty;
    const plan = wws ? wws.plan(due) : { send: due, held: 0 };
    const roundMbps = bytes / 1e3 / Math.max(duration, 0.001); // bytes/ms / 1e3 = MB/s
    const bandwidth = ctx.pacer.estimateMbps() ?? roundMbps;
    let d = policy.decide({
      round: round - diskWaitRounds,
      pagesSent: sentPages,
      bytesSent: bytes,
      durationMs: duration,
      sendingMs: busyMs,
      collectMs,
      dirtyPages: plan.send.length,
      dirtiedPages: dirty.length,
      heldPages: plan.held,
      elapsedMs: now() - ctx.tConnect,
      totalBytes: ctx.bytesSent,
      mbps: bandwidth,
      pageSize: region.pageSize,
    });
    // (a stop the round limit forced too: the write-back is better waited for with the guest running than inside its pause)
    if (d.action === 'stop' && options.disks?.length) {
      d = await waitForDurableDisks(ctx, d);
      if (d.action === 'continue') diskWaitRounds++;
    }
    const dirtyMbps = (dirty.length * region.pageSize) / 1e3 / Math.max(duration, 0.001);
    const stats = roundStats(ctx, {
      round,
      sentPages,
      bytes,
      duration,
      roundMbps,
      bandwidth,
      carried: unsent.length,
      dirtied: dirty.length,
      dirtyMbps,
      plan,
      decision: d,
      throttle: policy.throttle,
    });
    ctx.perRound.push(stats);
    // the next round's pages are listed before the event: a status read on it sees them due
    ctx.pending = plan.send;
    ctx.pendingSince = ctx.pagesSent;
    ctx.live.held = plan.held;
    ctx.progress({ type: 'round', ...stats });
    // Clark: the next round at this round's dirtying rate plus a margin
    if (ra) ctx.pacer.setRoundLimit((dirtyMbps * 1e6) / 2 ** 20 + ra.incrementMiBps);
    if (d.action === 'throttle') {
      ctx.throttled = true;
      await options.throttle!(d.level);
      ctx.maxThrottle = Math.max(ctx.maxThrottle, d.level);
    } else if (d.action === 'postcopy' || settings.mode === 'hybrid' || options.control?.postcopyRequested) {
      if (!link)
        throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `${d.reason}: the destination does not offer post-copy; the guest stays here`, { phase: 'precopy' });
      ctx.stopReason =
        d.action === 'postcopy'
          ? `${d.reason}: switching to post-copy`
          : settings.mode === 'hybrid'
            ? 'hybrid: switching to post-copy after the first pass'
            : 'post-copy requested';
      outcome = 'postcopy';
    } else if (d.action === 'abort') {
      throw new LivemigError(d.code, d.reason, { phase: 'precopy' });
    } else if (d.action === 'stop') {
      ctx.stopReason = d.reason;
      ctx.forcedStop = d.forced;
      outcome = 'stop-and-copy';
    }
  }
  await endPrecopy(ctx, wws);
  return outcome;
}

/** The held pages join the last ones, the extra channels end, and the destination catches up, before the pause. */
async function endPrecopy(ctx: SourceContext, wws: WritableWorkingSet | undefined): Promise<void> {
  // stop-and-copy goes at the cap, not at the last round's adapted rate
  ctx.pacer.setRoundLimit(undefined);
  const held = wws ? wws.heldPages() : new Uint32Array(0);
  if (held.length > 0) ctx.pending = mergePages(ctx.pending, held);
  ctx.pendingSince = ctx.pagesSent;
  ctx.live.held = 0;
  // The extra channels end here, before the pause: the pause's pages (and post-copy's) go on
  // the main connection, which ROUND_END {last} tells so; the destination acknowledges it once
  // every channel has ended, so from then on it takes any page there (docs/PROTOCOL.md).
  const { channels, version } = ctx.session;
  await channels.narrow(ctx.round, version, () => readRoundAck(ctx));
  // Let the destination finish applying what is in flight before the pause, so that the
  // pause does not pay for its backlog.
  while (channels.ackedRound < ctx.round) channels.ackedRound = Math.max(channels.ackedRound, (await readRoundAck(ctx)).round);
}

/** What the guest dirtied during the round, protection re-armed; and how long that took (the guest writes on meanwhile). */
async function collectRound(ctx: SourceContext, wws: WritableWorkingSet | undefined): Promise<{ dirty: Uint32Array; collectMs: number }> {
  const t0 = now();
  const dirty = await ctx.session.tracker.collect();
  const collectMs = now() - t0;
  ctx.live.rearmed(dirty.length);
  wws?.record(dirty);
  return { dirty, collectMs };
}

/** The convergence policy for this migration's settings. */
function convergencePolicy({ settings }: SourceContext): ConvergencePolicy {
  return new ConvergencePolicy({
    downtimeLimitMs: settings.downtimeLimitMs,
    maxRounds: settings.maxRounds,
    maxBytes: settings.maxBytes,
    onStall: settings.onStall,
    fixedCostMs: FIXED_STOP_COST_MS,
    ...(settings.options.deadlineMs !== undefined ? { deadlineMs: settings.options.deadlineMs } : {}),
  });
}

/**
 * The link is judged over the second LINK_WINDOW, not the first: on a host whose first touches
 * of memory are slow, the first 64 MiB measured 150-618 MB/s a channel on loopback from one run
 * of the same command to the next (the CPU and fresh pages, not the link), and the extra
 * channels ended in some runs and not others. A link one stream fills is as slow in the second.
 */
const JUDGED_AFTER = 2 * LINK_WINDOW;
/** a chunk before the link is judged holds at most this many times the pages the window's bytes make */
const MAX_CHUNK_SHRINK = 64;
const firstWindow = new WeakMap<object, LinkFigure>();

function linkMBps(ctx: SourceContext): number {
  const { channels } = ctx.session;
  const l = channels.link();
  const f = firstWindow.get(channels) ?? { bytes: 0, ms: 0 };
  const ms = l.ms - f.ms;
  return ms > 0 ? (l.bytes - f.bytes) / 1e3 / ms : Number.POSITIVE_INFINITY;
}

/** The extra channels are still up, and the link, measured, is below what needs more than one. */
function slowLink(ctx: SourceContext): boolean {
  const { channels } = ctx.session;
  if (channels.narrowed) return false;
  const l = channels.link();
  if (l.bytes >= LINK_WINDOW && !firstWindow.has(channels)) firstWindow.set(channels, l);
  return l.bytes >= JUDGED_AFTER && linkMBps(ctx) <= FAST_LINK_MBPS;
}

/** how long a round waits for the destination's disks before the next round goes */
const DISK_WAIT_MS = 20;

/**
 * With disks, the destination acknowledges a round once its blocks are on stable storage
 * (fdatasync behind the transfer). The pause's flush must have only the last round's blocks
 * left: while an earlier round is not yet acknowledged, pre-copy goes on (after a short wait
 * for an acknowledgement) instead of pausing the guest and waiting for the write-back inside
 * the pause, or idly before it while the guest dirties more.
 */
async function waitForDurableDisks(ctx: SourceContext, d: Decision & { action: 'stop' }): Promise<Decision> {
  const { conn, channels } = ctx.session;
  const noteAcks = (): void => {
    const queuedError = conn.takeQueuedError();
    if (queuedError) throw peerError(queuedError, 'precopy');
    for (let f = conn.takeQueued(FrameType.RoundAck); f; f = conn.takeQueued(FrameType.RoundAck)) {
      const ack = decodeRoundAck(f.payload);
      if (!ack.last) channels.ackedRound = Math.max(channels.ackedRound, ack.round);
    }
  };
  noteAcks();
  if (channels.ackedRound >= ctx.round - 1) return d;
  await conn.frameArrival(DISK_WAIT_MS);
  noteAcks();
  if (channels.ackedRound >= ctx.round - 1) return d;
  const behind = ctx.round - 1 - channels.ackedRound;
  return {
    action: 'continue',
    estimateMs: d.estimateMs,
    reason: `${d.reason}; but the destination's disks have ${behind} round${behind > 1 ? 's' : ''} not yet durable: one more round while they are written`,
  };
}

/** The next ROUND_ACK from the destination (progress: it applied a round). */
async function readRoundAck(ctx: SourceContext): Promise<RoundEnd> {
  const ack = decodeRoundAck((await ctx.session.conn.expect(FrameType.RoundAck, (f) => peerError(f, 'precopy'))).payload);
  ctx.deadlines.noteProgress();
  return ack;
}

/**
 * Sends a round's pages in chunks, paced; stops early at the byte bound, at the end of the
 * round's time budget, or when the deadline nears. Returns the bytes sent and the pages left.
 */
export async function sendRound(ctx: SourceContext, o: RoundPages & { budgetMs?: number }): Promise<{ bytes: number; unsent: Uint32Array; busyMs: number }> {
  const { round: r, pages, final = false, budgetMs } = o;
  const { settings, pacer } = ctx;
  const { region } = settings.options;
  // a page listed twice would be refused by the destination; say which list broke the rule
  const bad = firstOutOfOrder(pages);
  if (bad >= 0)
    throw new LivemigError('ERR_LIVEMIG_STATE', `internal: the page list of round ${r} is not ascending at ${bad} (${pages[bad - 1]}, ${pages[bad]})`, {
      phase: final ? 'stop-and-copy' : 'precopy',
    });
  const deadlineAt = ctx.deadlineAt;
  let bytes = 0;
  let at = 0;
  let busyMs = 0; // in the sends themselves, not the pacer's waits
  let tRoundStart: number | undefined;
  while (at < pages.length) {
    // chunks where the round may have to stop early: at a deadline, or at the byte bound
    const mayCross = !final && ctx.bytesSent + (pages.length - at) * region.pageSize > settings.maxBytes;
    let chunk = pacer.chunkPages(pages.length, { mayStopEarly: deadlineAt !== undefined || mayCross || budgetMs !== undefined });
    // channels not yet judged against the link: a chunk ends where it is, so that they can end.
    // Its pages are counted at the bytes a page of this round took so far (a zero page takes
    // none): chunks of pages that do not go on the wire do not wait for a window they never fill
    const { channels } = ctx.session;
    const judgedAt = channels.link().bytes < LINK_WINDOW ? LINK_WINDOW : JUDGED_AFTER;
    if (!channels.narrowed && channels.link().bytes < judgedAt) {
      const perPage = at > 0 ? Math.max(bytes / at, region.pageSize / MAX_CHUNK_SHRINK) : region.pageSize;
      chunk = Math.min(chunk, Math.max(1, Math.ceil((judgedAt - channels.link().bytes) / perPage)));
    }
    const part = pages.subarray(at, at + chunk);
    // on a link one stream fills, extra channels only cost CPU (and each its own compressor):
    // once the link is measured, they end and the main connection carries the rest
    if (!final && slowLink(ctx))
      await ctx.session.channels.narrow(
        r,
        ctx.session.version,
        () => readRoundAck(ctx),
        `the link measured ${Math.round(linkMBps(ctx))} MB/s over the ${LINK_WINDOW >> 20} MiB after the first ${LINK_WINDOW >> 20}, ` +
          'which one connection carries',
      );
    const t0 = now();
    tRoundStart ??= t0;
    const b = await ctx.sendPages({ round: r, pages: part, final });
    pacer.record(b, part.length, t0, now());
    busyMs += now() - t0;
    bytes += b;
    at += part.length;
    // no await when nothing waits: the last pages go inside the pause
    const wait = pacer.take(b);
    if (wait > 0) await pacer.sleep(wait);
    // the byte bound holds within a round too: the rest goes at the stop (the policy stops now)
    if (!final && ctx.bytesSent >= settings.maxBytes && at < pages.length) break;
    // a long round ends early (the rest joins the next one), so that the policy sees the
    // guest's dirtying rate and can act every second, not once per slow pass
    if (budgetMs !== undefined && at < pages.length && now() - tRoundStart >= budgetMs) break;
    // a switch to post-copy asked for (QEMU's migrate-start-postcopy) acts after this batch, not
    // at the end of a pass that can take minutes: the rest is among the pages post-copy moves
    if (!final && at < pages.length && settings.options.control?.postcopyRequested) break;
    // leave the rest to the stop-and-copy (or to giving up) rather than run out of time
    if (deadlineAt !== undefined && !final && at < pages.length) {
      const mbps = pacer.estimateMbps() ?? 1;
      if (now() + ((pages.length - at) * region.pageSize) / 1e3 / mbps > deadlineAt - 2 * settings.downtimeLimitMs) break;
    }
  }
  return { bytes, unsent: pages.subarray(at), busyMs };
}

/** One round as the report and the progress events give it (names after QEMU's query-migrate). */
function roundStats(
  ctx: SourceContext,
  r: {
    round: number;
    sentPages: number;
    bytes: number;
    duration: number;
    roundMbps: number;
    bandwidth: number;
    carried: number;
    dirtied: number;
    dirtyMbps: number;
    plan: { send: Uint32Array; held: number };
    decision: Decision;
    throttle: number;
  },
): RoundStats {
  const pageSize = ctx.settings.options.region.pageSize;
  const perPage = r.sentPages > 0 ? r.bytes / r.sentPages : pageSize;
  return {
    round: r.round,
    pages: r.sentPages,
    bytes: r.bytes,
    duration_ms: +r.duration.toFixed(3),
    mbps: +r.roundMbps.toFixed(1),
    bandwidth_mbps: +r.bandwidth.toFixed(1),
    carried_pages: r.carried,
    dirty_pages: r.dirtied,
    dirty_pages_rate: +((r.dirtied * 1000) / Math.max(r.duration, 0.001)).toFixed(0),
    dirty_mbps: +r.dirtyMbps.toFixed(1),
    wws_pages: r.plan.held,
    transferred: ctx.bytesSent,
    remaining: Math.round((r.plan.send.length + r.plan.held) * perPage),
    remaining_pages: r.plan.send.length + r.plan.held,
    expected_downtime_ms: +r.decision.estimateMs.toFixed(3),
    cpu_throttle_percentage: r.throttle,
    max_bandwidth_mib_s: ctx.pacer.limitMiBps,
    decision: r.decision.action,
    reason: r.decision.reason,
  };
}
