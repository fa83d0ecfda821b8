/**
 * Stage 1, handshake and reservation: connect, HELLO and ACCEPT, the dedup index from what the
 * destination holds, and everything the first round would otherwise pay for (our mapping of
 * the guest's pages, the encoder's buffers and threads, the tracker's choice) done while the
 * destination reserves the region.
 */
import { trace } from '../trace.js';
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, call, type NativeDedup } from '../native.js';
import { PageEncoder } from '../encoding/encoder.js';
import type { PostcopyLink } from '../postcopy/switch.js';
import { CAP_COMMIT_ACTIVATE, CAP_ENCODINGS, CAP_IMAGE_HASHES, CAP_LOCAL, CAP_POSTCOPY, CAP_POSTCOPY_PLANNED, CAP_RESOLVE, FrameType, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeAccept, decodeImageHashes, encodeHello, type Accept } from '../protocol/messages.js';
import type { WireChannel } from '../protocol/wire.js';
import { isLoopback, openChannel } from '../security/tls.js';
import { frameLimits } from '../protocol/limits.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import { offerMemory } from '../guest/local.js';
import { HashTracker } from '../tracking/hash.js';
import { SharedMemoryTracker } from '../tracking/shared.js';
import { chooseTracker } from '../tracking/probe.js';
import { warmUpRuntime } from '../warmup.js';
import { now, type SourceContext } from './context.js';
import { invalid } from './options.js';
import { connect, peerError } from './peer.js';

export async function handshake(ctx: SourceContext): Promise<void> {
  const { settings } = ctx;
  const { options } = settings;
  // a same-host upgrade: the memory is offered by reference; HELLO names where
  const local = options.local ? offerMemory(settings.layout, options.local.pieces, settings.handshakeTimeoutMs) : undefined;
  try {
    await exchange(ctx, local);
  } catch (e) {
    local?.close();
    throw e;
  }
}

async function exchange(ctx: SourceContext, local: ReturnType<typeof offerMemory> | undefined): Promise<void> {
  const { settings } = ctx;
  const { options } = settings;
  const { region } = options;
  // Map the guest's pages into our own mapping while the destination reserves: reading
  // through unmapped pages would fault once per page in the middle of the first round (a
  // same-host upgrade reads none)
  const populated = local ? Promise.resolve() : region.populateAsync(false);
  populated.catch(() => undefined); // awaited below
  const socket = await connect(options.to);
  trace('source', 'connected');
  // a cancel during the secure handshake ends it here (the channel does not exist yet)
  ctx.onAbort(() => socket.destroy());
  const remote = socket.remoteAddress ?? '';
  const opened = await openChannel(socket, options.credentials, 'client', settings.handshakeTimeoutMs);
  const channel = opened.channel;
  ctx.onAbort(undefined);
  ctx.channel = channel;
  channel.setFrameLimits(frameLimits({ pageCount: region.pageCount }));
  if (ctx.abortReason) channel.abort(ctx.abortReason);
  // frames from the destination are read as they come, so an ERROR it sends while we are
  // busy sending pages explains the failure instead of a bare connection reset
  channel.readAhead();
  ctx.enter('handshake');
  const enc = settings.encodings;
  const wantEncodings = enc.zero || enc.dedup || enc.compress;
  const capabilities = [
    ...(local ? [CAP_LOCAL] : []),
    ...(wantEncodings ? [CAP_ENCODINGS] : []),
    CAP_COMMIT_ACTIVATE,
    CAP_RESOLVE,
    ...(settings.mayPostcopy ? [CAP_POSTCOPY] : []),
    ...(settings.mode !== 'precopy' ? [CAP_POSTCOPY_PLANNED] : []),
  ];
  await channel.send(encodeHello({ versions: [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION], regionBytes: region.size, pageSize: region.pageSize, auth: null, capabilities, regions: settings.layout.toWire(), ...(local ? { local: local.offer } : {}) }));
  trace('source', 'HELLO sent');
  const accept = decodeAccept((await channel.expect(FrameType.Accept, (f) => peerError(f, 'handshake'), settings.handshakeTimeoutMs)).payload);
  if (accept.version < MIN_PROTOCOL_VERSION || accept.version > PROTOCOL_VERSION) {
    throw new LivemigError('ERR_LIVEMIG_VERSION', `destination chose protocol version ${accept.version}, outside ${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION}`, { phase: 'handshake' });
  }
  const version = accept.version;
  if (local) {
    if (!accept.capabilities.includes(CAP_LOCAL)) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', 'the destination does not take memory by reference (a same-host upgrade needs a livemig that offers `local`)', { phase: 'handshake' });
    await local.served; // it took the memory before it accepted
  }
  // before version 3 the destination does not prove it holds the image before the commit
  // (an impostor that echoes our digest could make us release the guest): only an
  // unauthenticated migration on loopback, the demo's, may still speak it
  if (version < 3 && (options.credentials !== undefined || !isLoopback(remote))) {
    throw new LivemigError('ERR_LIVEMIG_VERSION', `the destination speaks protocol version ${version}, whose commit it does not prove: refused off loopback and with credentials (version 3 needed)`, { phase: 'handshake' });
  }
  // the hand-over's code paths run once now, not for the first time inside the pause
  warmUpRuntime();
  warmUpProtocol(version);
  const link = postcopyLink(ctx, accept, version);
  if (settings.mode !== 'precopy' && !link) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `mode ${settings.mode}: the destination does not offer post-copy`, { phase: 'handshake' });
  const dedup = wantEncodings && version >= 2 && accept.capabilities.includes(CAP_ENCODINGS) ? await dedupIndex(ctx, channel, accept) : undefined;
  // the encoder (first touch of its buffers included) is set up while the destination
  // reserves: in the first round it would take the CPU from the guest and the round
  const encoder = dedup ? new PageEncoder({ region, channel, hashes: ctx.hashes, dedup, encodings: enc, version, batchPages: settings.batchPages, probe: () => ctx.tracker?.writtenProbe?.() }) : undefined;
  ctx.encoder = encoder;
  await Promise.all([populated, encoder?.prepare()]);
  const prepMs = now() - ctx.tConnect;
  let tracker = options.tracker;
  let trackerReason = 'given by the caller';
  if (!tracker && local) {
    tracker = new SharedMemoryTracker(region.pageCount);
    trackerReason = 'shared: a same-host upgrade; the destination maps the very memory, nothing is sent';
  } else if (!tracker && options.untracked) {
    tracker = new HashTracker(region);
    trackerReason = 'hash: the guest registered no write tracking (userfaultfd WP_ASYNC), so every page is hashed each round';
  } else if (!tracker) {
    const choice = chooseTracker(region, options.target ? { target: options.target } : {});
    tracker = choice.tracker;
    trackerReason = `${choice.backend}: ${choice.reason}`;
  }
  ctx.tracker = tracker;
  ctx.session = { channel, version, accept, tracker, trackerReason, link, encoder, prepMs, security: opened.security };
  ctx.progress({ type: 'handshake', prep_ms: prepMs, version, tracker: tracker.backend, tracker_reason: trackerReason });
}

function postcopyLink(ctx: SourceContext, accept: Accept, version: number): PostcopyLink | undefined {
  if (!accept.capabilities.includes(CAP_POSTCOPY) || !accept.session) return undefined;
  const { options } = ctx.settings;
  const to = options.to;
  const open =
    options.connect ??
    (() => {
      if (to instanceof net.Socket) throw invalid('post-copy needs `connect` (a way to open more connections) when `to` is a socket');
      return connect(to);
    });
  // every further connection (the priority one, and each after a break) is authenticated too
  const reconnect = async (): Promise<WireChannel> => (await openChannel(await open(), options.credentials, 'client', ctx.settings.handshakeTimeoutMs)).channel;
  return { session: accept.session, version, connect: reconnect };
}

/** Both sides start the dedup index from what the destination holds: a fresh (all-zero) region, or the image whose hashes it sends now. */
async function dedupIndex(ctx: SourceContext, channel: WireChannel, accept: Accept): Promise<NativeDedup> {
  const { region } = ctx.settings.options;
  const dedup = call('ERR_LIVEMIG_NO_MEMORY', 'handshake', 'creating the dedup index', () => new addon.Dedup(region.pageCount));
  const image = accept.capabilities.includes(CAP_IMAGE_HASHES)
    ? decodeImageHashes((await channel.expect(FrameType.ImageHashes, (f) => peerError(f, 'handshake'), ctx.settings.handshakeTimeoutMs)).payload, region.pageCount)
    : new BigUint64Array(region.pageCount).fill(call('ERR_LIVEMIG_SYSCALL', 'handshake', 'the zero page hash', () => addon.zeroPageHash()));
  call('ERR_LIVEMIG_INVALID_ARGUMENT', 'handshake', 'loading the destination image into the dedup index', () => dedup.initImage(image));
  return dedup;
}
