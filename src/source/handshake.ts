/**
 * Stage 1, handshake and reservation: connect, HELLO and ACCEPT, the dedup index from what the
 * destination holds, and everything the first round would otherwise pay for (our mapping of
 * the guest's pages, the encoder's buffers and threads, the tracker's choice) done while the
 * destination reserves the region.
 */
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, call, type NativeDedup } from '../native.js';
import { PageEncoder } from '../encoding/encoder.js';
import type { LinkFigure } from '../encoding/chooser.js';
import type { PostcopyLink } from '../postcopy/switch.js';
import {
  CAP_CHANNELS,
  CAP_COMMIT_ACTIVATE,
  CAP_ENCODINGS,
  CAP_IMAGE_HASHES,
  CAP_LOCAL,
  CAP_POSTCOPY,
  CAP_POSTCOPY_PLANNED,
  CAP_RESOLVE,
  CAP_DISKS,
  CAP_HOLES,
  FrameType,
  MIN_SOURCE_VERSION,
  PROTOCOL_VERSION,
} from '../protocol/format.js';
import { decodeAccept, decodeImageHashes, encodeHello, type Accept, type HelloBacking } from '../protocol/messages.js';
import type { RegionBacking } from '../region/huge-pages.js';
import type { FramedConnection } from '../protocol/connection.js';
import { openConnection } from '../security/tls.js';
import { frameLimits } from '../protocol/limits.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import { offerMemory } from '../guest/local.js';
import { memoryTracker } from './memory-tracker.js';
import { warmUpRuntime } from '../warmup.js';
import { CompressorPool, type Compressor } from '../encoding/compressor.js';
import { now, type SourceContext } from './context.js';
import { invalid } from './options.js';
import { connect, peerError } from './peer.js';
import { chooseReadPath, type ReadPath } from '../region/read-path.js';
import { attachChannel, canConnect, chooseChannels, OutgoingChannels, type ChannelChoice } from './channels.js';

export async function handshake(ctx: SourceContext): Promise<void> {
  const { settings } = ctx;
  const { options } = settings;
  // a same-host upgrade: the memory is offered by reference; HELLO names where
  const local = options.local ? offerMemory(settings.layout, options.local.pieces, settings.handshakeTimeoutMs) : undefined;
  const compressors = new CompressorPool();
  try {
    await exchange(ctx, local, compressors);
  } catch (e) {
    local?.close();
    throw e;
  } finally {
    await compressors.close(); // those no channel took
  }
}

// eslint-disable-next-line max-lines-per-function -- 119 lines: connect, HELLO/ACCEPT and its checks, channels, encoders, in protocol order
async function exchange(ctx: SourceContext, local: ReturnType<typeof offerMemory> | undefined, compressors: CompressorPool): Promise<void> {
  const { settings } = ctx;
  const { options } = settings;
  const { region } = options;
  const postcopyOffered = settings.mayPostcopy && !refusePostcopyOnHugetlb(settings, region.backing);
  // The guest's pages are mapped while the destination reserves (a same-host upgrade reads
  // none): post-copy serves them from the mapping, and pre-copy reads them through it where
  // that is cheaper than through the files on this host (region/read-path.ts). Only where the
  // files hold data: mapping (and reading) a hole of the guest's memfd allocates it.
  const resident = local ? undefined : region.dataExtents();
  // through the files, pre-copy needs no mapping (nor disks' data read into memory ahead)
  const mapped = options.readPath !== 'files' || postcopyOffered || settings.mode !== 'precopy';
  const populated: Promise<ReadPath> =
    resident && mapped
      ? resident.then(async (e) => (await region.populateAsync(false, e), chooseReadPath(region, e, options.readPath)))
      : Promise.resolve(local ? { path: 'files', reason: 'a same-host upgrade reads no page' } : { path: 'files', reason: 'asked for' });
  populated.catch(() => undefined); // awaited below
  const socket = await connect(options.to);
  trace('source', SourceEvent.connected);
  // a cancel during the secure handshake ends it here (the FramedConnection does not exist yet)
  ctx.onAbort(() => socket.destroy());
  const opened = await openConnection(socket, options.credentials, 'client', settings.handshakeTimeoutMs);
  const conn = opened.conn;
  ctx.onAbort(undefined);
  ctx.conn = conn;
  conn.setFrameLimits(frameLimits({ pageCount: region.pageCount }));
  if (ctx.abortReason) conn.abort(ctx.abortReason);
  // frames from the destination are read as they come, so an ERROR it sends while we are
  // busy sending pages explains the failure instead of a bare connection reset
  conn.readAhead();
  ctx.enter('handshake');
  const enc = settings.encodings;
  const wantEncodings = enc.zero || enc.dedup || enc.compress;
  // a same-host upgrade sends no page: one connection
  const wanted = local
    ? { count: 1, reason: 'a same-host upgrade sends no page' }
    : settings.mode === 'postcopy'
      ? { count: 1, reason: 'post-copy from the start has no pre-copy pass' }
      : chooseChannels({ asked: options.channels, canConnect: canConnect(options.to, options.connect) });
  if (wantEncodings && enc.compress && !local) compressors.start(wanted.count);
  const capabilities = [
    ...(wanted.count > 1 ? [CAP_CHANNELS] : []),
    ...(local ? [CAP_LOCAL] : []),
    ...(wantEncodings ? [CAP_ENCODINGS] : []),
    CAP_COMMIT_ACTIVATE,
    CAP_RESOLVE,
    ...(local ? [] : [CAP_HOLES]),
    ...(postcopyOffered ? [CAP_POSTCOPY] : []),
    ...(settings.mode !== 'precopy' ? [CAP_POSTCOPY_PLANNED] : []),
    ...(options.disks?.length ? [CAP_DISKS] : []),
  ];
  await conn.send(
    encodeHello({
      versions: [MIN_SOURCE_VERSION, PROTOCOL_VERSION],
      regionBytes: region.size,
      pageSize: region.pageSize,
      auth: null,
      capabilities,
      regions: settings.layout.toWire(),
      ...(local ? { local: local.offer } : {}),
      ...(wanted.count > 1 ? { channels: wanted.count } : {}),
      ...(options.guestName !== undefined ? { guest: options.guestName } : {}),
      ...helloBacking(region.backing),
      ...(resident ? { resident: await resident } : {}),
      ...(options.disks?.length ? { disks: options.disks.map((d) => ({ name: d.name, size: d.size })) } : {}),
    }),
  );
  trace('source', SourceEvent.helloSent);
  const accept = decodeAccept((await conn.expect(FrameType.Accept, (f) => peerError(f, 'handshake'), settings.handshakeTimeoutMs)).payload);
  checkProofOffered(accept, { local: local !== undefined });
  if (options.disks?.length && !accept.capabilities.includes(CAP_DISKS))
    throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', 'the destination does not take disks (a livemig that offers `disks`)', { phase: 'handshake' });
  const version = accept.version;
  if (local) {
    if (!accept.capabilities.includes(CAP_LOCAL))
      throw new LivemigError(
        'ERR_LIVEMIG_UNSUPPORTED',
        'the destination does not take memory by reference (a same-host upgrade needs a livemig that offers `local`)',
        { phase: 'handshake' },
      );
    await local.served; // it took the memory before it accepted
  }
  // the hand-over's code paths run once now, not for the first time inside the pause
  warmUpRuntime();
  warmUpProtocol(version);
  const link = postcopyLink(ctx, accept, version);
  if (settings.mode !== 'precopy' && !link)
    throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `mode ${settings.mode}: the destination does not offer post-copy`, { phase: 'handshake' });
  const granted = grantedChannels(accept, wanted);
  const image = wantEncodings && version >= 2 && accept.capabilities.includes(CAP_ENCODINGS) ? await destinationImage(ctx, conn, accept) : undefined;
  // what the destination holds from the start, when it said (a kept image): a hole here is not all it needs there
  if (image && accept.capabilities.includes(CAP_IMAGE_HASHES)) ctx.destinationHashes = image;
  const extras = granted.count > 1 ? await openExtraChannels(ctx, accept.session!, granted.count, version) : [];
  // the encoders (first touch of their buffers included) are set up while the destination
  // reserves: in the first round they would take the CPU from the guest and the round
  const conns = [conn, ...extras];
  const linkFigure = (): LinkFigure | undefined => ctx.channels?.link();
  const encoders = conns.map((conn, k) =>
    image
      ? new PageEncoder({
          region,
          conn,
          hashes: ctx.hashes,
          dedup: dedupIndex(region.pageCount, image, conns.length, k),
          encodings: enc,
          version,
          batchPages: settings.batchPages,
          link: linkFigure,
          onSent: (b, pages) => ctx.channels?.noteSent(b, pages),
          ...withCompressor(compressors.take()),
        })
      : undefined,
  );
  const encoder = encoders[0];
  ctx.encoder = encoder;
  const channels = new OutgoingChannels({
    channels: conns.map((conn, k) => ({ conn, encoder: encoders[k], roundPages: 0 })),
    sendPlain: async (conn, r, pages) =>
      (await conn.sendPages({ region, pages, round: r, version, batchPages: settings.batchPages, hashes: ctx.hashes })).bytes,
  });
  ctx.channels = channels;
  const [readPath] = await Promise.all([populated, ...encoders.map((e) => e?.prepare())]);
  const prepMs = now() - ctx.tConnect;
  const { tracker, reason: trackerReason } = memoryTracker(region, options, local !== undefined);
  ctx.tracker = tracker;
  ctx.session = { conn, version, accept, tracker, trackerReason, readPath, link, encoder, channels, channelChoice: granted, prepMs, security: opened.security };
  ctx.progress({
    type: 'handshake',
    prep_ms: prepMs,
    version,
    tracker: tracker.backend,
    tracker_reason: trackerReason,
    channels: granted.count,
    channels_reason: granted.reason,
  });
}

/**
 * The destination must be able to prove it holds the image before we commit (version 3's
 * DIGEST, negotiated with `commit-activate`): an ACCEPT that drops either would let whoever
 * answers make us release a guest it does not hold, so it ends the migration here, with the
 * guest never paused. A same-host upgrade proves itself otherwise: the destination took the
 * memory from a socket that only this authenticated connection's token opens.
 */
function checkProofOffered(accept: Accept, o: { local: boolean }): void {
  if (accept.version < MIN_SOURCE_VERSION || accept.version > PROTOCOL_VERSION) {
    throw new LivemigError(
      'ERR_LIVEMIG_VERSION',
      `the destination chose protocol version ${accept.version}; this source speaks ${MIN_SOURCE_VERSION}..${PROTOCOL_VERSION} (from version ` +
        `${MIN_SOURCE_VERSION} on the destination proves it holds the image before the commit): upgrade the destination's livemig`,
      { phase: 'handshake' },
    );
  }
  if (!o.local && !accept.capabilities.includes(CAP_COMMIT_ACTIVATE)) {
    throw new LivemigError(
      'ERR_LIVEMIG_PROTOCOL',
      "the destination's ACCEPT drops commit-activate, without which it does not prove it holds the image before the commit: refused, the guest stays here",
      { phase: 'handshake' },
    );
  }
}

function postcopyLink(ctx: SourceContext, accept: Accept, version: number): PostcopyLink | undefined {
  if (!accept.capabilities.includes(CAP_POSTCOPY) || !accept.session) return undefined;
  return { session: accept.session, version, connect: anotherConnection(ctx, 'post-copy') };
}

/** Opens one more connection to the destination, authenticated as the first one was. */
function anotherConnection(ctx: SourceContext, why: 'post-copy' | 'channels'): () => Promise<FramedConnection> {
  const { options } = ctx.settings;
  const to = options.to;
  const open =
    options.connect ??
    (() => {
      if (to instanceof net.Socket) throw invalid(`${why} needs \`connect\` (a way to open more connections) when \`to\` is a socket`);
      return connect(to);
    });
  // every further connection (the priority one, each after a break, each channel) is authenticated too
  return async (): Promise<FramedConnection> => {
    const conn = (await openConnection(await open(), options.credentials, 'client', ctx.settings.handshakeTimeoutMs)).conn;
    if (why === 'channels') conn.setFrameLimits(frameLimits({ pageCount: options.region.pageCount }));
    return conn;
  };
}

/** What the destination granted of the channels asked for. */
function grantedChannels(accept: Accept, wanted: ChannelChoice): ChannelChoice {
  if (wanted.count === 1) return wanted;
  const n = accept.capabilities.includes(CAP_CHANNELS) ? (accept.channels ?? 1) : 1;
  if (n > wanted.count)
    throw new LivemigError('ERR_LIVEMIG_PROTOCOL', `the destination granted ${n} channels, ${wanted.count} were asked for`, { phase: 'handshake' });
  if (n > 1 && !accept.session)
    throw new LivemigError('ERR_LIVEMIG_PROTOCOL', 'the destination granted channels without a session token to attach them with', { phase: 'handshake' });
  if (n === wanted.count) return wanted;
  return {
    count: n,
    reason:
      n === 1 && !accept.capabilities.includes(CAP_CHANNELS) ? 'the destination does not offer channels' : `the destination granted ${n} of ${wanted.count}`,
  };
}

/** Channels 1.. of the session, each authenticated and named with ATTACH; all closed if one fails. */
async function openExtraChannels(ctx: SourceContext, session: string, count: number, version: number): Promise<FramedConnection[]> {
  const open = anotherConnection(ctx, 'channels');
  const opened = await Promise.allSettled(
    Array.from({ length: count - 1 }, (_, i) => attachChannel({ open, session, channel: i + 1, version, timeoutMs: ctx.settings.handshakeTimeoutMs })),
  );
  const failed = opened.find((o): o is PromiseRejectedResult => o.status === 'rejected');
  const conns = opened.flatMap((o) => (o.status === 'fulfilled' ? [o.value] : []));
  if (failed) {
    for (const conn of conns) conn.close();
    throw failed.reason instanceof LivemigError
      ? failed.reason
      : new LivemigError('ERR_LIVEMIG_CONNECTION', `opening a channel failed: ${(failed.reason as Error).message}`, {
          phase: 'handshake',
          cause: failed.reason,
        });
  }
  if (ctx.abortReason) for (const conn of conns) conn.abort(ctx.abortReason);
  return conns;
}

/** What the destination holds before any page moves: a fresh (all-zero) region, or the image whose hashes it sends now. */
async function destinationImage(ctx: SourceContext, conn: FramedConnection, accept: Accept): Promise<BigUint64Array> {
  const { region } = ctx.settings.options;
  return accept.capabilities.includes(CAP_IMAGE_HASHES)
    ? decodeImageHashes((await conn.expect(FrameType.ImageHashes, (f) => peerError(f, 'handshake'), ctx.settings.handshakeTimeoutMs)).payload, region.pageCount)
    : new BigUint64Array(region.pageCount).fill(call('ERR_LIVEMIG_SYSCALL', 'handshake', 'the zero page hash', () => addon.zeroPageHash()));
}

/** Channel k's dedup index, from the destination's image: only its own stripes (channels.ts). */
function dedupIndex(pageCount: number, image: BigUint64Array, channels: number, k: number): NativeDedup {
  const dedup = call('ERR_LIVEMIG_NO_MEMORY', 'handshake', 'creating the dedup index', () => new addon.Dedup(pageCount));
  call('ERR_LIVEMIG_INVALID_ARGUMENT', 'handshake', 'loading the destination image into the dedup index', () => dedup.initImage(image, channels, k));
  return dedup;
}

/** What HELLO says of the guest's huge pages, so that the destination reserves the same kind (docs/PROTOCOL.md). */
function helloBacking(b: RegionBacking): { backing?: HelloBacking } {
  return b.kind === 'hugetlb' || b.kind === 'shmem-thp' ? { backing: { kind: b.kind, pageSize: b.pageSize } } : {};
}

/**
 * Post-copy resolves a fault one 4 KiB page at a time (UFFDIO_CONTINUE on a shmem minor fault):
 * hugetlbfs takes whole huge pages only, so a hugetlb guest migrates by pre-copy. Asked for
 * explicitly, that is refused before anything moves; otherwise post-copy is just not offered
 * (true: the caller must not offer it).
 */
function refusePostcopyOnHugetlb(settings: SourceContext['settings'], backing: RegionBacking): boolean {
  if (backing.kind !== 'hugetlb') return false;
  const asked = settings.mode !== 'precopy' ? `mode ${settings.mode}` : settings.onStall === 'postcopy' ? 'on-stall postcopy' : undefined;
  if (asked)
    throw new LivemigError(
      'ERR_LIVEMIG_UNSUPPORTED',
      `${asked}: the guest's memory is on hugetlbfs, which post-copy cannot fill 4 KiB at a time; use pre-copy`,
      {
        phase: 'handshake',
      },
    );
  return true;
}

const withCompressor = (c: Compressor | undefined): { compressor?: Compressor } => (c ? { compressor: c } : {});
