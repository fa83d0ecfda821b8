/**
 * Stage 2, pre-copy rounds, and the frame loop that runs to the end: PAGES frames are applied
 * natively as they arrive (checked, received straight into the region, hashed), on this
 * connection and on the extra channels; this loop sees the control frames between them, acks
 * each round and hands the later frames to their stages (device state, commit, activation,
 * post-copy).
 */
import { syncDisksBehind } from '../disk/incoming.js';
import { LivemigError } from '../errors.js';
import { ProtocolError } from '../protocol/errors.js';
import { FrameType } from '../protocol/format.js';
import { frameLimits } from '../protocol/limits.js';
import { decodeRoundEnd, encodeError, encodeRoundAck } from '../protocol/messages.js';
import { sourceAborted } from './failures.js';
import type { PageSink, WireFrame } from '../protocol/wire.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import { IncomingChannels, type Join } from './channels.js';
import { activate, commit } from './commit.js';
import { AUTH_TIMEOUT_MS, Received, type Accepted, type ReceiverContext } from './context.js';
import { takeDeviceState } from './device-state.js';
import { switchToPostcopy } from './postcopy.js';
import type { ReceiveReport } from './types.js';

/** Applies frames until the guest runs here (activation or post-copy), or the migration fails. */
export async function receiveUntilRunning(ctx: ReceiverContext, a: Accepted): Promise<ReceiveReport> {
  const { region, hashes } = a;
  const { conn, version } = ctx;
  ctx.enter('receiving');
  const got = new Received();
  // a same-host upgrade takes no page: a page frame is refused below, never applied
  const whole: PageSink | undefined = a.local ? undefined : { region, hashes, version, encodings: a.encodings };
  if (whole && a.channels > 1) {
    const joinMs = ctx.options.authTimeoutMs ?? AUTH_TIMEOUT_MS;
    const limits = frameLimits({ pageCount: region.pageCount });
    const join: Join = { joinMs, prepare: (c) => c.setFrameLimits(limits), version };
    ctx.channels = new IncomingChannels({ count: a.channels, session: ctx.session, sink: whole, join, onFailure: (e) => channelFailed(ctx, e) });
  }
  const striped = whole && IncomingChannels.mainSink(whole, a.channels);
  for (;;) {
    // after the extra channels ended, every page comes on this connection
    const sink = got.channelsEnded ? whole : striped;
    const f = await conn.next(undefined, ctx.stage === 'receiving' ? sink : undefined);
    got.pages += f.pages;
    if (f.lastRound > got.tracedRound) {
      got.tracedRound = f.lastRound;
      trace('receiver', ReceiverEvent.roundPagesApplied, { round: f.lastRound });
    }
    if (f.version !== version) throw new ProtocolError('ERR_LIVEMIG_VERSION', `frame of version ${f.version} after negotiating ${version}`);
    switch (f.type) {
      case FrameType.Pages:
      case FrameType.PagesEnc:
        throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `${FrameType[f.type]} ${a.local ? 'in a same-host upgrade, which moves no page' : 'after COMMIT'}`);
      case FrameType.RoundEnd:
        await roundEnd(ctx, f, got);
        break;
      case FrameType.DeviceState:
        await takeDeviceState(ctx, f, a, got);
        break;
      case FrameType.Commit: {
        const activateNow = await commit(ctx, f.payload, a, got);
        if (!activateNow) break;
        return await activate(ctx, a, got); // a COMMIT with activate activates at once
      }
      case FrameType.Activate:
        return await activate(ctx, a, got);
      case FrameType.Postcopy:
        return await switchToPostcopy(ctx, f.payload, a, got);
      case FrameType.Abort:
        ctx.sourceSaidWhy = true;
        throw sourceAborted(f.payload, ctx.stage);
      default:
        throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unexpected ${FrameType[f.type]} frame while ${ctx.stage}`);
    }
  }
}

async function roundEnd(ctx: ReceiverContext, f: WireFrame, got: Received): Promise<void> {
  const r = decodeRoundEnd(f.payload);
  got.rounds = Math.max(got.rounds, r.round);
  // frames are applied in order, so everything before this one is in the region now
  if (f.lastRound > r.round) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `ROUND_END for round ${r.round} after pages of round ${f.lastRound}`);
  // with channels, the round is applied once every channel has passed its ROUND_END too
  await ctx.channels?.reached(r.round);
  if (r.last) await channelsEnded(ctx, got);
  if (ctx.disks) {
    // the round's disk blocks go to stable storage while the next round comes, and its
    // ROUND_ACK once they are there: the source pauses only after its last round's ack, so the
    // sync inside the pause has the pause's own blocks left, not the whole image
    const disks = ctx.disks;
    const ack = (ctx.diskAcks ?? Promise.resolve()).then(() => syncDisksBehind(disks)).then(() => ctx.conn.send(encodeRoundAck(r, ctx.version)));
    // a sync that fails ends the migration here with its cause, not with an ack that never comes
    ack.catch((e: unknown) =>
      ctx.conn.abort(
        e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_SYSCALL', `round ${r.round}: ${(e as Error).message}`, { phase: 'precopy', cause: e }),
      ),
    );
    ctx.diskAcks = ack;
  } else {
    await ctx.conn.send(encodeRoundAck(r, ctx.version));
  }
  ctx.progress({ type: 'round', round: r.round, pages: r.pages });
}

/** ROUND_END {last} on the main connection: once every extra channel has ended, all pages come here. */
async function channelsEnded(ctx: ReceiverContext, got: Received): Promise<void> {
  if (!ctx.channels || got.channelsEnded) {
    throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', ctx.channels ? 'a second ROUND_END last' : 'ROUND_END last without extra channels');
  }
  await ctx.channels.ended();
  got.pages += ctx.channels.pages;
  got.channelsEnded = true;
  trace('receiver', ReceiverEvent.channelsEnded);
}

/**
 * An extra channel failed: the source hears why on the main connection (the one it reads),
 * then the main read ends with the same error and the migration is discarded.
 */
function channelFailed(ctx: ReceiverContext, e: LivemigError): void {
  if (ctx.toldSource) return;
  ctx.toldSource = true;
  const phase = e.phase ?? ctx.stage;
  void ctx.conn
    .send(encodeError({ code: e.code, message: e.message, phase }, ctx.version))
    .catch(() => undefined) // the main connection is gone too: the source hears that instead
    .finally(() => ctx.conn.abort(e));
}
