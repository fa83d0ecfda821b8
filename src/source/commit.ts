/**
 * Stage 4, commitment and activation. With `commit-activate` (the usual case) COMMIT carries
 * the request to activate: one round trip. Without it (a version-1 destination), COMMIT_ACK
 * then ACTIVATE. Either way the point of commitment is the moment the frame that lets the
 * destination activate has been written whole.
 */
import { LivemigError } from '../errors.js';
import { digestOf } from '../native.js';
import { CAP_COMMIT_ACTIVATE, FrameType } from '../protocol/format.js';
import { decodeActivated, decodeCommitAck, decodeDigest, encodeActivate, encodeCommit, encodeDeviceState } from '../protocol/messages.js';
import type { WireChannel } from '../protocol/wire.js';
import { trace } from '../trace.js';
import { now, type SourceContext } from './context.js';
import { peerError } from './peer.js';
import { resolveLostCommitment } from './resolve.js';
import type { StoppedGuest } from './stop-and-copy.js';

export interface Activation {
  digest: bigint;
  /** when everything up to COMMIT was written, when the commitment was confirmed, when the guest ran there */
  tSent: number;
  tCommitted: number;
  tActive: number;
  /** the destination's own activation time, ms */
  activateMs: number;
}

export async function commitAndActivate(ctx: SourceContext, stopped: StoppedGuest): Promise<Activation> {
  const { channel, version, accept } = ctx.session;
  const pageCount = ctx.settings.options.region.pageCount;
  // version 3: the destination proves it holds the image before we commit (DIGEST). A same-host
  // upgrade has no image to prove: the destination took the memory itself, from a socket only
  // the token it got on this authenticated connection opens
  const prove = version >= 3 && accept.capabilities.includes(CAP_COMMIT_ACTIVATE) && !ctx.settings.options.local;
  const deviceState = encodeDeviceState(stopped.deviceState, version, prove);
  let digest: bigint;
  let tSent: number;
  let tCommitted: number;
  let activated: ReturnType<typeof decodeActivated>;
  if (accept.capabilities.includes(CAP_COMMIT_ACTIVATE)) {
    // The device state goes before our digest is known: the destination hands it to its guest
    // and computes its own digest while we compute ours (each reads a table of 8 bytes per
    // page: ~0.4 ms for 1 GiB here), instead of one after the other. COMMIT is the point of
    // commitment: a write that failed did not deliver it whole, so the guest may still resume
    // here; once the write is done, an ERROR back means it did not activate.
    await channel.send(deviceState);
    ctx.announceCommitment();
    digest = digestOf(ctx.hashes, 'commit');
    trace('source', 'digest computed');
    if (prove) await checkProof(channel, digest, pageCount);
    await ctx.beginCommitment();
    await channel.send(encodeCommit({ digest, pageCount, activate: true }, version));
    ctx.enter('activating');
    tSent = now();
    trace('source', 'last pages, device state and COMMIT sent', { pages: stopped.lastPages });
    activated = await confirmActivation(ctx);
    tCommitted = now();
    reportCommitted(ctx, digest, stopped);
  } else {
    digest = digestOf(ctx.hashes, 'commit');
    await channel.send(deviceState);
    tSent = now();
    ctx.enter('commit');
    await channel.send(encodeCommit({ digest, pageCount }, version));
    const ack = decodeCommitAck((await channel.expect(FrameType.CommitAck, (f) => peerError(f, 'commit'))).payload);
    if (ack.digest !== digest) throw new LivemigError('ERR_LIVEMIG_DIGEST', `destination acknowledged digest ${ack.digest.toString(16)}, ours is ${digest.toString(16)}`, { phase: 'commit' });
    tCommitted = now();
    reportCommitted(ctx, digest, stopped);
    // Point of commitment: once ACTIVATE is on its way, the source must never resume by itself.
    await ctx.beginCommitment();
    ctx.enter('activating');
    await channel.send(encodeActivate(version));
    activated = await confirmActivation(ctx);
  }
  const tActive = now();
  trace('source', 'ACTIVATED received');
  return { digest, tSent, tCommitted, tActive, activateMs: activated.activateMs };
}

/**
 * ACTIVATED, after the point of commitment. An ERROR instead means it did not activate (the
 * rollback resumes the guest here). A lost link is resolved when the destination offers it:
 * asked on a new connection, it says whether it activated; without an answer within
 * resolveTimeoutMs the outcome is unknown and the guest stays paused here.
 */
async function confirmActivation(ctx: SourceContext): Promise<ReturnType<typeof decodeActivated>> {
  const { channel } = ctx.session;
  try {
    // a destination silent this long after COMMIT is asked on a new connection (it may be
    // stopped, or the link dark): the deadlines stopped at the commitment, this one did not
    return decodeActivated((await channel.expect(FrameType.Activated, (f) => peerError(f, 'activate'), ctx.settings.progressTimeoutMs)).payload);
  } catch (e) {
    await resolveLostCommitment(ctx, e, 'ACTIVATED');
    return { activateMs: 0 }; // it runs there; how long activation took is lost with the link
  }
}

/**
 * The destination's own digest against ours, before anything commits: a mismatch (or a peer
 * that skips the proof) ends the migration with the guest resumed here.
 */
async function checkProof(channel: WireChannel, digest: bigint, pageCount: number): Promise<void> {
  const theirs = decodeDigest((await channel.expect(FrameType.Digest, (f) => peerError(f, 'commit'))).payload);
  trace('source', 'destination digest received');
  if (theirs.pageCount !== pageCount || theirs.digest !== digest) {
    throw new LivemigError('ERR_LIVEMIG_DIGEST', `the destination's digest ${theirs.digest.toString(16)} over ${theirs.pageCount} pages differs from ours, ${digest.toString(16)} over ${pageCount}: it does not hold this image`, { phase: 'commit' });
  }
}

function reportCommitted(ctx: SourceContext, digest: bigint, stopped: StoppedGuest): void {
  ctx.progress({ type: 'committed', digest: digest.toString(16) });
  ctx.progress({ type: 'stop-and-copy', pages: stopped.lastPages, bytes: stopped.lastBytes });
}
