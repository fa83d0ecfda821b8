/**
 * Stage 4, commitment and activation: COMMIT's digest must match ours and the guest must take
 * its state before this side commits; the guest is activated at ACTIVATE (or at a COMMIT that
 * asks for it), and only if the source has not resolved the session as not activated. The
 * report of a pre-copy migration is made here.
 */
import { LivemigError } from '../errors.js';
import { digestOf } from '../native.js';
import { closeDisks, syncDisksFinal } from '../disk/incoming.js';
import { ProtocolError } from '../protocol/errors.js';
import { decodeCommit, encodeActivated, encodeCommitAck } from '../protocol/messages.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import type { Accepted, Received, ReceiverContext } from './context.js';
import type { ReceiveReport } from './types.js';

/** how long the source has to close after ACTIVATED (it does at once; a slow one is asked to resolve) */
const CONFIRM_WAIT_MS = 2_000;

/** COMMIT: the digests must match and the guest must take its state; returns whether to activate now. */
export async function commit(ctx: ReceiverContext, payload: Buffer, a: Accepted, got: Received): Promise<boolean> {
  if (ctx.stage !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'a second COMMIT');
  trace('receiver', ReceiverEvent.commitReceived);
  const c = decodeCommit(payload);
  if (got.deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT before DEVICE_STATE');
  if (c.pageCount !== a.region.pageCount) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `COMMIT for ${c.pageCount} pages, region has ${a.region.pageCount}`);
  if (c.activate && !a.commitActivate) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT with activate, which was not negotiated');
  if (got.digestAt !== got.pages) got.digest = digestOf(a.hashes, 'commit');
  if (got.digest !== c.digest) {
    const why = `image digest ${got.digest.toString(16)} differs from the source's ${c.digest.toString(16)}`;
    throw new LivemigError('ERR_LIVEMIG_DIGEST', why, { phase: 'commit' });
  }
  if (got.prepared) await got.prepared; // a state the guest refuses fails here, before commitment
  // the disks' blocks on stable storage before this side proves it holds them: every round's are
  // (its ROUND_ACK followed its sync, and the source paused only after the last), so a pause that
  // carried no block leaves nothing to sync (a device cache flush that cost 0.5-2.6 ms of it)
  if (a.disks && c.diskBlocks !== 0) await syncDisksFinal(a.disks);
  if (!c.activate) await ctx.conn.send(encodeCommitAck({ digest: got.digest }, ctx.version));
  ctx.enter('committed');
  ctx.progress({ type: 'committed', digest: got.digest.toString(16) });
  return c.activate === true;
}

export async function activate(ctx: ReceiverContext, a: Accepted, got: Received): Promise<ReceiveReport> {
  const { conn } = ctx;
  if (ctx.stage !== 'committed') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'ACTIVATE before a matching COMMIT');
  // a session the source resolved as not activated (it lost the link) never activates
  if (ctx.outcome && !ctx.outcome.beginActivation()) {
    throw new LivemigError('ERR_LIVEMIG_REFUSED', 'this session was resolved as not activated: it is fenced and will never activate', { phase: 'activate' });
  }
  const ta = performance.now();
  trace('receiver', ReceiverEvent.activating);
  // by pre-copy every block is here: the guest's accesses must not wait on anyone (they go on at
  // once; the group's teardown runs beside the activation, and is awaited once ACTIVATED went)
  const unwatched = ctx.diskWatch?.close();
  unwatched?.catch(() => undefined);
  await ctx.options.activate(a.memory ?? a.region, got.deviceState!);
  trace('receiver', ReceiverEvent.guestActivated);
  ctx.enter('activated');
  ctx.outcome?.settle('activated');
  const activateMs = performance.now() - ta;
  // a source that gave up waiting (and closed) before this goes out cannot hear it
  const gaveUp = conn.peerGone();
  const sent = await conn.send(encodeActivated({ activateMs }, ctx.version)).then(
    () => true,
    () => false, // the guest runs here either way; the source will ask (RESOLVE)
  );
  trace('receiver', ReceiverEvent.activatedSent);
  if (a.disks) {
    // the guest runs on the images: this side lets go of them and of their mapping, out of the pause
    closeDisks(a.disks);
    ctx.disks = undefined;
    a.region.release();
    await unwatched;
  }
  ctx.progress({ type: 'activated', activate_ms: activateMs });
  // the source closes once it has read ACTIVATED: without that close it may not know, and
  // will ask on a new connection (a listener that stays up answers: activated)
  const confirmed = (await conn.finish(undefined, CONFIRM_WAIT_MS)) && sent && !gaveUp;
  return {
    region_bytes: a.region.size,
    regions: ctx.regionsReport(),
    local: a.local,
    reserve_ms: a.reserveMs,
    pages_received: got.pages,
    rounds: got.rounds,
    digest: got.digest.toString(16).padStart(16, '0'),
    activate_ms: activateMs,
    mode: 'precopy',
    security: ctx.security,
    confirmed,
  };
}
