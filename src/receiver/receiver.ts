/**
 * The destination side: validate, reserve, apply, verify, commit, activate.
 *   hello -> reserve -> receiving -> committed -> activated
 *                                \-> postcopy (postcopy.ts)
 * Nothing is activated before a matching commitment digest and the sender's ACTIVATE; any
 * failure before that discards the region. Every frame is checked before it is used.
 */
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, call, digestOf } from '../native.js';
import type { FaultService } from '../postcopy/dest.js';
import { ProtocolError } from '../protocol/errors.js';
import { CAP_COMMIT_ACTIVATE, CAP_ENCODINGS, CAP_IMAGE_HASHES, CAP_POSTCOPY, CAP_POSTCOPY_PLANNED, FrameType, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeAbort, decodeCommit, decodeHello, decodeRoundEnd, encodeAccept, encodeActivated, encodeCommitAck, encodeError, encodeImageHashes, encodeRoundAck, negotiateVersion } from '../protocol/messages.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import { WireChannel, type PageSink } from '../protocol/wire.js';
import { PAGE_SIZE, Region } from '../region/region.js';
import { trace } from '../trace.js';
import { warmUpRuntime } from '../warmup.js';
import { loadImage } from './image.js';
import { runPostcopy } from './postcopy.js';
import { SessionTable, type PostcopySession } from './session.js';
import type { ReceiveOptions, ReceiveReport, ReceiverState } from './types.js';
import { Stages } from '../stages.js';

const NEXT = {
  hello: ['reserve', 'failed'],
  reserve: ['receiving', 'failed'],
  receiving: ['committed', 'postcopy', 'failed'],
  committed: ['activated', 'failed'],
  activated: [],
  postcopy: [],
  failed: [],
} as const satisfies { readonly [S in ReceiverState]: readonly ReceiverState[] };

export type { ReceiveOptions, ReceiveProgress, ReceiveReport, ReceiverState } from './types.js';

/**
 * Serves one migration on an accepted connection. `sessions` is where a listener routes the
 * connections that join a post-copy session (without one, nobody can join: no post-copy).
 */
export async function receiveOn(socket: net.Socket, options: ReceiveOptions, sessions = new SessionTable()): Promise<ReceiveReport> {
  const progress = options.onProgress ?? (() => undefined);
  const idle = options.idleTimeoutMs ?? 60_000;
  const ch = WireChannel.fromSocket(socket);
  ch.setIdleTimeout(idle); // a peer silent this long is gone
  const stage = new Stages<ReceiverState>('hello', 'failed', NEXT);
  let version = PROTOCOL_VERSION;
  let region: Region | undefined;
  let session: PostcopySession | undefined;
  let faults: FaultService | undefined;
  try {
    const hello = await ch.next();
    if (hello.type !== FrameType.Hello) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `the first frame must be HELLO, got ${FrameType[hello.type]}`);
    if (hello.version < MIN_PROTOCOL_VERSION || hello.version > PROTOCOL_VERSION) {
      throw new ProtocolError('ERR_LIVEMIG_VERSION', `protocol version ${hello.version} is not supported (this receiver speaks ${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION})`);
    }
    const h = decodeHello(hello.payload);
    const v = negotiateVersion(h.versions);
    if (v === undefined) throw new ProtocolError('ERR_LIVEMIG_VERSION', `no common protocol version: peer speaks ${h.versions[0]}..${h.versions[1]}, we speak ${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION}`);
    version = v;
    if (h.pageSize !== PAGE_SIZE) throw new LivemigError('ERR_LIVEMIG_REFUSED', `page size ${h.pageSize} differs from this host's ${PAGE_SIZE}`, { phase: 'handshake' });
    if (h.regionBytes % PAGE_SIZE !== 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `region of ${h.regionBytes} bytes is not a whole number of pages`);
    if (options.maxRegionBytes !== undefined && h.regionBytes > options.maxRegionBytes) {
      throw new LivemigError('ERR_LIVEMIG_NO_MEMORY', `region of ${h.regionBytes} bytes exceeds this receiver's limit of ${options.maxRegionBytes}`, { phase: 'reserve' });
    }

    stage.enter('reserve');
    const t0 = performance.now();
    region = Region.create(h.regionBytes, { name: 'livemig-incoming', reserve: true });
    // Map every page now (faults are slow on VM hosts), while the integrator prepares its
    // side of the same memory: both finish before the first page is accepted.
    const populated = region.populateAsync(true);
    populated.catch(() => undefined); // awaited below, after onReserved
    const postcopyCap = version >= 2 && options.postcopy !== undefined && h.capabilities.includes(CAP_POSTCOPY);
    const postcopyPlanned = postcopyCap && h.capabilities.includes(CAP_POSTCOPY_PLANNED);
    await options.onReserved?.(region, !postcopyCap ? 'no' : postcopyPlanned ? 'planned' : 'possible');
    await populated;
    const reserveMs = performance.now() - t0;
    progress({ type: 'reserved', region_bytes: region.size, reserve_ms: reserveMs });
    const hashes = new BigUint64Array(region.pageCount);
    // Encodings (version 2): `hashes` says what each page holds from the start, all zero or
    // the kept image (whose hashes the sender receives); a dup is checked against it.
    let encodings = false;
    let imageHashes = false;
    if (version >= 2 && h.capabilities.includes(CAP_ENCODINGS)) {
      encodings = true;
      if (options.reuseImage && (await loadImage(region, options.reuseImage, hashes))) {
        imageHashes = true;
        progress({ type: 'image', path: options.reuseImage });
      } else {
        if (options.reuseImage) progress({ type: 'image-ignored', path: options.reuseImage, reason: `its size is not the region's ${region.size} bytes` });
        hashes.fill(call('ERR_LIVEMIG_SYSCALL', 'reserve', 'the zero page hash', () => addon.zeroPageHash()));
      }
    }
    const commitActivate = h.capabilities.includes(CAP_COMMIT_ACTIVATE);
    const caps = [...(encodings ? [CAP_ENCODINGS] : []), ...(imageHashes ? [CAP_IMAGE_HASHES] : []), ...(commitActivate ? [CAP_COMMIT_ACTIVATE] : []), ...(postcopyCap ? [CAP_POSTCOPY] : [])];
    // post-copy: further connections join this session with ATTACH naming its token
    session = postcopyCap ? sessions.open() : undefined;
    // the post-copy page table, touched now so that the switch does not fault its memory in
    const neededTable = session ? new Uint8Array(region.pageCount).fill(1) : undefined;
    await ch.send(encodeAccept({ version, capabilities: caps, ...(session ? { session: session.token } : {}) }, version));
    if (imageHashes) await ch.send(encodeImageHashes(hashes, version));
    // the hand-over's code paths run once now, not for the first time inside the pause
    warmUpRuntime();
    warmUpProtocol(version);

    stage.enter('receiving');
    let deviceState: Buffer | undefined;
    let pagesReceived = 0;
    let rounds = 0;
    let digest = 0n;
    let digestAt = -1; // pagesReceived when `digest` was computed
    let prepared: Promise<void> | undefined;
    // PAGES frames are applied natively as they arrive (checked, received straight into the
    // region, hashed); the loop sees the control frames between them.
    const sink: PageSink = { region, hashes, version, encodings };
    for (;;) {
      const f = await ch.next(undefined, stage.current === 'receiving' ? sink : undefined);
      pagesReceived += f.pages;
      if (f.version !== version) throw new ProtocolError('ERR_LIVEMIG_VERSION', `frame of version ${f.version} after negotiating ${version}`);
      switch (f.type) {
        case FrameType.Pages:
        case FrameType.PagesEnc:
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `${FrameType[f.type]} after COMMIT`);
        case FrameType.RoundEnd: {
          const r = decodeRoundEnd(f.payload);
          rounds = Math.max(rounds, r.round);
          // frames are applied in order, so everything before this one is in the region now
          if (f.lastRound > r.round) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `ROUND_END for round ${r.round} after pages of round ${f.lastRound}`);
          await ch.send(encodeRoundAck(r, version));
          progress({ type: 'round', round: r.round, pages: r.pages });
          break;
        }
        case FrameType.DeviceState:
          if (stage.current !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'DEVICE_STATE after COMMIT');
          deviceState = Buffer.from(f.payload);
          trace('receiver', 'DEVICE_STATE received');
          if (options.prepare && !prepared) {
            prepared = options.prepare(region, deviceState);
            prepared.catch(() => undefined); // awaited at COMMIT or POSTCOPY
          }
          // the last pages came before the device state: the digest is known while COMMIT is on its
          // way (post-copy from the start ends with a digest of its own: none is due here)
          if (!postcopyPlanned) {
            digestAt = pagesReceived;
            digest = digestOf(hashes, 'commit');
          }
          trace('receiver', 'guest preparing, digest computed');
          break;
        case FrameType.Commit: {
          if (stage.current !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'a second COMMIT');
          trace('receiver', 'COMMIT received');
          const c = decodeCommit(f.payload);
          if (deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT before DEVICE_STATE');
          if (c.pageCount !== region.pageCount) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `COMMIT for ${c.pageCount} pages, region has ${region.pageCount}`);
          if (digestAt !== pagesReceived) digest = digestOf(hashes, 'commit');
          if (digest !== c.digest) {
            throw new LivemigError('ERR_LIVEMIG_DIGEST', `image digest ${digest.toString(16)} differs from the source's ${c.digest.toString(16)}`, { phase: 'commit' });
          }
          if (c.activate && !commitActivate) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT with activate, which was not negotiated');
          if (prepared) await prepared; // a state the guest refuses fails here, before commitment
          if (!c.activate) await ch.send(encodeCommitAck({ digest }, version));
          stage.enter('committed');
          progress({ type: 'committed', digest: digest.toString(16) });
          if (!c.activate) break;
        }
        // falls through: a COMMIT with activate activates at once
        case FrameType.Activate: {
          if (stage.current !== 'committed') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'ACTIVATE before a matching COMMIT');
          const ta = performance.now();
          trace('receiver', 'activating');
          await options.activate(region, deviceState!);
          trace('receiver', 'guest activated');
          stage.enter('activated');
          const activateMs = performance.now() - ta;
          await ch.send(encodeActivated({ activateMs }, version)).catch(() => undefined); // the guest runs here either way
          trace('receiver', 'ACTIVATED sent');
          progress({ type: 'activated', activate_ms: activateMs });
          await ch.finish();
          return { region_bytes: region.size, reserve_ms: reserveMs, pages_received: pagesReceived, rounds, digest: digest.toString(16).padStart(16, '0'), activate_ms: activateMs, mode: 'precopy' };
        }
        case FrameType.Postcopy: {
          if (!postcopyCap || !options.postcopy || !session || !neededTable) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY, which was not negotiated');
          if (stage.current !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `POSTCOPY while ${stage.current}`);
          if (deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY before DEVICE_STATE');
          return await runPostcopy(
            {
              ch,
              payload: f.payload,
              region,
              hashes,
              neededTable,
              deviceState,
              version,
              session,
              options: { ...options, postcopy: options.postcopy },
              progress,
              onRunning: () => stage.enter('postcopy'),
              onFaults: (s) => (faults = s),
            },
            { region_bytes: region.size, reserve_ms: reserveMs, pages_received: pagesReceived, rounds },
          );
        }
        case FrameType.Abort:
          throw new LivemigError('ERR_LIVEMIG_ABORTED', `the source aborted: ${decodeAbort(f.payload).reason}`, { phase: stage.current });
        default:
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unexpected ${FrameType[f.type]} frame while ${stage.current}`);
      }
    }
  } catch (e) {
    const failedIn = stage.fail();
    const err =
      e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_ABORTED', `receive failed while ${failedIn}: ${(e as Error).message}`, { phase: failedIn, cause: e });
    const tell = !ch.closed && err.code !== 'ERR_LIVEMIG_ABORTED' && failedIn !== 'postcopy';
    await ch.finish(tell ? encodeError({ code: err.code, message: err.message, phase: err.phase ?? failedIn }, version) : undefined);
    // in post-copy the guest runs here on whatever pages it has: the region stays
    if (faults && failedIn !== 'postcopy') faults.stop();
    if (region && failedIn !== 'activated' && failedIn !== 'postcopy') {
      options.onDiscard?.(region);
      region.release(); // nothing was activated: the destination copy is discarded
    }
    throw err;
  } finally {
    if (session) sessions.end(session);
  }
}
