/**
 * Stage 4, commitment and activation: DEVICE_STATE, the destination's proof (DIGEST, its own
 * digest of what it holds, compared with ours), then COMMIT carrying the request to activate:
 * one round trip. The point of commitment is the moment COMMIT has been written whole.
 */
import { LivemigError } from '../errors.js';
import { digestOf } from '../native.js';
import { FrameType } from '../protocol/format.js';
import { decodeActivated, decodeDigest, encodeCommit, encodeDeviceState } from '../protocol/messages.js';
import type { FramedConnection } from '../protocol/connection.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
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
  const { conn, version } = ctx.session;
  const pageCount = ctx.settings.options.region.pageCount;
  // The destination proves it holds the image before we commit (DIGEST): the handshake refused
  // any destination that could not. A same-host upgrade has no image to prove: the destination
  // took the memory itself, from a socket only the token it got on this connection opens.
  const prove = !ctx.settings.options.local;
  // The device state goes before our digest is known: the destination hands it to its guest
  // and computes its own digest while we compute ours (each reads a table of 8 bytes per
  // page: ~0.4 ms for 1 GiB here), instead of one after the other. COMMIT is the point of
  // commitment: a write that failed did not deliver it whole, so the guest may still resume
  // here; once the write is done, an ERROR back means it did not activate.
  await conn.send(encodeDeviceState(stopped.deviceState, version, { prove }));
  ctx.announceCommitment();
  const digest = digestOf(ctx.hashes, 'commit');
  trace('source', SourceEvent.digestComputed);
  if (prove) await checkProof(conn, digest, pageCount);
  await ctx.beginCommitment();
  const disks = ctx.settings.options.disks?.length ? { diskBlocks: ctx.finalDiskBlocks } : {};
  await conn.send(encodeCommit({ digest, pageCount, activate: true, ...disks }, version));
  ctx.enter('activating');
  const tSent = now();
  trace('source', SourceEvent.commitSent, { pages: stopped.lastPages });
  const activated = await confirmActivation(ctx);
  const tCommitted = now();
  reportCommitted(ctx, digest, stopped);
  const tActive = now();
  trace('source', SourceEvent.activatedReceived);
  return { digest, tSent, tCommitted, tActive, activateMs: activated.activateMs };
}

/**
 * ACTIVATED, after the point of commitment. An ERROR instead means it did not activate (the
 * rollback resumes the guest here). A lost link is resolved when the destination offers it:
 * asked on a new connection, it says whether it activated; without an answer within
 * resolveTimeoutMs the outcome is unknown and the guest stays paused here.
 */
async function confirmActivation(ctx: SourceContext): Promise<ReturnType<typeof decodeActivated>> {
  const { conn } = ctx.session;
  try {
    // a destination silent this long after COMMIT is asked on a new connection (it may be
    // stopped, or the link dark): the deadlines stopped at the commitment, this one did not
    return decodeActivated((await conn.expect(FrameType.Activated, (f) => peerError(f, 'activate'), ctx.settings.progressTimeoutMs)).payload);
  } catch (e) {
    await resolveLostCommitment(ctx, e, 'ACTIVATED');
    return { activateMs: 0 }; // it runs there; how long activation took is lost with the link
  }
}

/**
 * The destination's own digest against ours, before anything commits: a mismatch (or a peer
 * that skips the proof) ends the migration with the guest resumed here.
 */
async function checkProof(conn: FramedConnection, digest: bigint, pageCount: number): Promise<void> {
  const theirs = decodeDigest((await conn.expect(FrameType.Digest, (f) => peerError(f, 'commit'))).payload);
  trace('source', SourceEvent.destinationDigestReceived);
  if (theirs.pageCount !== pageCount || theirs.digest !== digest) {
    throw new LivemigError(
      'ERR_LIVEMIG_DIGEST',
      `the destination's digest ${theirs.digest.toString(16)} over ${theirs.pageCount} pages differs from ours, ${digest.toString(16)} over ` +
        `${pageCount}: it does not hold this image`,
      { phase: 'commit' },
    );
  }
}

function reportCommitted(ctx: SourceContext, digest: bigint, stopped: StoppedGuest): void {
  ctx.progress({ type: 'committed', digest: digest.toString(16) });
  ctx.progress({ type: 'stop-and-copy', pages: stopped.lastPages, bytes: stopped.lastBytes });
}
