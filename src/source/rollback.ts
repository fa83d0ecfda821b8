/**
 * Stage 5, rollback: what a failure leaves behind. Before commitment the destination is told to
 * discard, tracking stops, the throttle is released and the guest resumes here. After it, the
 * guest lives at the destination (or nobody knows yet): this copy stays paused, never resumed.
 */
import { LivemigError } from '../errors.js';
import { PROTOCOL_VERSION } from '../protocol/format.js';
import { encodeAbort } from '../protocol/messages.js';
import type { SourceContext } from './context.js';
import { isReportedByPeer, peerError } from './peer.js';

/** How long a destination that refused something gets for its ERROR to arrive after our send failed. */
const PEER_ERROR_GRACE_MS = 50;

/** Undoes what can be undone; returns the error to throw. */
export async function rollback(ctx: SourceContext, e: unknown): Promise<LivemigError> {
  const failedIn = ctx.fail();
  const { conn, tracker, channels, settings } = ctx;
  ctx.unbindControl();
  // a cancel told on every connection: each stays open until the destination read its ABORT
  // and closed (or the time it had is up), not closed under it before it knew why
  if (ctx.cancelTold) await Promise.all((channels ? channels.all.map((c) => c.conn) : conn ? [conn] : []).map((c) => c.finish()));
  channels?.closeExtras();
  // A destination that refused something sends ERROR and closes; our send may fail first.
  // Its ERROR, if it arrives within a moment, is the real cause.
  if (conn && e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CONNECTION') {
    await new Promise((r) => setTimeout(r, PEER_ERROR_GRACE_MS));
    const f = conn.takeQueuedError();
    if (f) e = peerError(f, failedIn);
  }
  // a cancel or a deadline ended it: that is the cause, not the connection it shut down
  if (ctx.abortReason) e = ctx.abortReason;
  const err =
    e instanceof LivemigError
      ? e
      : new LivemigError('ERR_LIVEMIG_ABORTED', `migration failed in ${failedIn}: ${(e as Error).message}`, { phase: failedIn, cause: e });
  if (failedIn === 'postcopy' || failedIn === 'done') {
    // the guest runs at the destination: it must never resume here; this copy stays, paused
    conn?.close();
    return err;
  }
  // The destination answering ACTIVATE with an ERROR has discarded its copy (its activation
  // failed): the source is still the only guest, so it resumes below like any early failure.
  if (failedIn === 'activating' && !isReportedByPeer(err)) {
    conn?.close();
    if (err.code === 'ERR_LIVEMIG_ACTIVATION_UNKNOWN') return err; // resolving was tried and says how to go on
    return new LivemigError(
      'ERR_LIVEMIG_ACTIVATION_UNKNOWN',
      `ACTIVATE was sent but not confirmed (${err.message}); the source guest stays paused and is not released: check the destination before resuming it`,
      {
        phase: 'activate',
        cause: err,
      },
    );
  }
  if (conn) await conn.finish(conn.closed ? undefined : encodeAbort({ reason: err.message }, PROTOCOL_VERSION));
  await tracker?.stop().catch(() => undefined); // a stop failure must not hide the cause
  await channels?.closeEncoders().catch(() => undefined);
  if (ctx.throttled) {
    try {
      await settings.options.throttle!(0); // the guest runs at full speed here again
    } catch (te) {
      return new LivemigError('ERR_LIVEMIG_GUEST', `migration failed (${err.message}) and releasing the guest's throttle failed: ${(te as Error).message}`, {
        phase: failedIn,
        cause: te,
      });
    }
  }
  if (ctx.paused) {
    try {
      await settings.options.resume();
    } catch (re) {
      return new LivemigError(
        'ERR_LIVEMIG_GUEST',
        `migration failed (${err.message}) and resuming the guest on the source failed too: ${(re as Error).message}`,
        { phase: failedIn, cause: re },
      );
    }
  }
  return err;
}
