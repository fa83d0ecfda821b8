/**
 * The destination side: validate, reserve, apply, verify, commit, activate.
 *   hello -> reserve -> receiving -> committed -> activated
 *                                \-> postcopy (postcopy.ts)
 * Nothing is activated before a matching commitment digest and the sender's ACTIVATE; any
 * failure before that discards the region. Every frame is checked before it is used.
 */
import { randomBytes } from 'node:crypto';
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, call, closeFd, digestOf } from '../native.js';
import type { FaultService } from '../postcopy/dest.js';
import { ProtocolError } from '../protocol/errors.js';
import { CAP_CHANNELS, CAP_COMMIT_ACTIVATE, CAP_ENCODINGS, CAP_IMAGE_HASHES, CAP_LOCAL, CAP_POSTCOPY, CAP_POSTCOPY_PLANNED, CAP_RESOLVE, FLAG_PROVE, FrameType, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeAbort, decodeCommit, decodeHello, decodeRoundEnd, encodeAccept, encodeActivated, encodeCommitAck, encodeDigest, encodeError, encodeImageHashes, encodeRoundAck, negotiateVersion, type Hello } from '../protocol/messages.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import type { PageSink, WireChannel, WireFrame } from '../protocol/wire.js';
import { isLoopback, type SecurityReport } from '../security/tls.js';
import { GuestLayout } from '../guest/layout.js';
import { takeMemory } from '../guest/local.js';
import { PAGE_SIZE, Region } from '../region/region.js';
import { trace } from '../trace.js';
import { warmUpRuntime } from '../warmup.js';
import { admit, type Admitted } from './admit.js';
import type { PendingTicket } from './pending.js';
import { loadImage } from './image.js';
import { frameLimits } from '../protocol/limits.js';
import { memoryBudget } from './memory-budget.js';
import { runPostcopy } from './postcopy.js';
import { OutcomeTable, type SessionOutcome } from './outcomes.js';
import { SessionTable, type PostcopySession } from './session.js';
import { IncomingChannels, maxChannels } from './channels.js';
import type { ReceiveOptions, ReceiveProgress, ReceiveReport, ReceiverState } from './types.js';
import { Stages } from '../stages.js';
import { markMayBeAskedAbout, refusedBeforeReserving } from './failures.js';

/** How long a source may take to authenticate (the destination holds nothing for it meanwhile). */
const AUTH_TIMEOUT_MS = 10_000;
/** how long the source has to close after ACTIVATED (it does at once; a slow one is asked to resolve) */
const CONFIRM_WAIT_MS = 2_000;

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

export { isRefusedBeforeReserving, mayBeAskedAbout, refusedBeforeReserving } from './failures.js';

/**
 * Serves one migration on an accepted connection. `sessions` is where a listener routes the
 * connections that join a post-copy session (without one, nobody can join: no post-copy).
 */
export async function receiveOn(socket: net.Socket, options: ReceiveOptions, sessions = new SessionTable(), outcomes = new OutcomeTable()): Promise<ReceiveReport> {
  const opened = await admitIncoming(socket, options).catch((e: unknown) => Promise.reject(refusedBeforeReserving(e)));
  return serveMigration(opened, opened.first, options, sessions, outcomes);
}

/** An accepted connection, authenticated (nothing is reserved for a source that cannot authenticate), with its first frame. */
export async function admitIncoming(socket: net.Socket, options: ReceiveOptions, timeoutMs = options.authTimeoutMs ?? AUTH_TIMEOUT_MS, ticket?: PendingTicket): Promise<Admitted> {
  const a = await admit(socket, options.credentials, timeoutMs, ticket);
  a.channel.setIdleTimeout(options.idleTimeoutMs ?? 60_000); // a peer silent this long is gone
  return a;
}

/** Serves one migration whose first frame (`first`, which must be HELLO) has been read. */
export async function serveMigration(opened: Omit<Admitted, 'first'>, first: WireFrame, options: ReceiveOptions, sessions: SessionTable, outcomes: OutcomeTable, abortable?: Set<(reason: LivemigError) => boolean>): Promise<ReceiveReport> {
  const incoming = new Incoming(opened.channel, options, sessions, outcomes, opened.security, opened.local, opened.remote);
  const abort = (reason: LivemigError): boolean => incoming.abortBeforeDeviceState(reason);
  abortable?.add(abort);
  try {
    const hello = incoming.hello(first);
    const accepted = await incoming.reserve(hello);
    return await incoming.receive(accepted);
  } catch (e) {
    throw await incoming.discard(e);
  } finally {
    abortable?.delete(abort);
    incoming.endSession();
  }
}

/** What the handshake settled. */
interface Accepted {
  region: Region;
  /** per-page hashes of what this side holds (the commitment digest is over them) */
  hashes: BigUint64Array;
  encodings: boolean;
  commitActivate: boolean;
  postcopyPlanned: boolean;
  reserveMs: number;
  /** a same-host upgrade: the memory is the source's own */
  local: boolean;
  /** connections pre-copy's pages come on, this one included (CAP_CHANNELS) */
  channels: number;
  /** post-copy was negotiated */
  postcopy: boolean;
}

/** One incoming migration: its connection, its stage and what it holds so far. */
class Incoming {
  readonly #ch: WireChannel;
  readonly #options: ReceiveOptions;
  readonly #sessions: SessionTable;
  readonly #outcomes: OutcomeTable;
  #outcome: SessionOutcome | undefined;
  readonly #progress: (e: ReceiveProgress) => void;
  readonly #stage = new Stages<ReceiverState>('hello', 'failed', NEXT);
  readonly #security: SecurityReport;
  /** the address the source reached: on loopback, an old source may still migrate unauthenticated */
  readonly #local: string;
  #version = PROTOCOL_VERSION;
  #region: Region | undefined;
  /** the guest's regions in the page space (HELLO's table, or one region) */
  #layout: GuestLayout | undefined;
  #session: PostcopySession | undefined;
  #channels: IncomingChannels | undefined;
  /** the source was sent an ERROR already (an extra channel's failure) */
  #toldSource = false;
  #faults: FaultService | undefined;
  /** from the device state on, COMMIT may be on its way: a failure may leave the source asking */
  #deviceStateSeen = false;
  #sourceSaidWhy = false;
  /** gives the bytes taken at HELLO back to the shared budget */
  #releaseMemory: (() => void) | undefined;

  /** where the source connected from, and its authenticated name when it has one */
  readonly #peer: string;

  constructor(ch: WireChannel, options: ReceiveOptions, sessions: SessionTable, outcomes: OutcomeTable, security: SecurityReport, local: string, remote: string) {
    this.#ch = ch;
    this.#peer = security.peer ?? remote;
    this.#outcomes = outcomes;
    this.#local = local;
    this.#security = security;
    this.#options = options;
    this.#sessions = sessions;
    this.#progress = options.onProgress ?? (() => undefined);
  }

  #regionsReport(): ReceiveReport['regions'] {
    return (this.#layout?.regions ?? []).map((r) => ({ id: r.id, name: r.name, bytes: r.size }));
  }

  /** HELLO: version, geometry and limits checked before anything is reserved. */
  hello(hello: WireFrame): Hello {
    if (hello.type !== FrameType.Hello) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `the first frame must be HELLO, got ${FrameType[hello.type]}`);
    if (hello.version < MIN_PROTOCOL_VERSION || hello.version > PROTOCOL_VERSION) {
      throw new ProtocolError('ERR_LIVEMIG_VERSION', `protocol version ${hello.version} is not supported (this receiver speaks ${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION})`);
    }
    const h = decodeHello(hello.payload);
    const v = negotiateVersion(h.versions);
    if (v === undefined) throw new ProtocolError('ERR_LIVEMIG_VERSION', `no common protocol version: peer speaks ${h.versions[0]}..${h.versions[1]}, we speak ${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION}`);
    this.#version = v;
    // from here each frame's payload is bounded by what this region can need
    this.#ch.setFrameLimits(frameLimits({ pageCount: h.regionBytes / PAGE_SIZE, ...(this.#options.maxDeviceStateBytes !== undefined ? { maxDeviceStateBytes: this.#options.maxDeviceStateBytes } : {}) }));
    if (v < 3 && (this.#options.credentials !== undefined || !isLoopback(this.#local))) {
      throw new ProtocolError('ERR_LIVEMIG_VERSION', `protocol version ${v} does not let this side prove its image before the commit: refused off loopback and with credentials (version 3 needed)`);
    }
    if (h.pageSize !== PAGE_SIZE) throw new LivemigError('ERR_LIVEMIG_REFUSED', `page size ${h.pageSize} differs from this host's ${PAGE_SIZE}`, { phase: 'handshake' });
    if (h.regionBytes % PAGE_SIZE !== 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `region of ${h.regionBytes} bytes is not a whole number of pages`);
    if (this.#options.maxRegionBytes !== undefined && h.regionBytes > this.#options.maxRegionBytes) {
      throw new LivemigError('ERR_LIVEMIG_NO_MEMORY', `region of ${h.regionBytes} bytes exceeds this receiver's limit of ${this.#options.maxRegionBytes}`, { phase: 'reserve' });
    }
    // without a limit given, what this host can hold now
    // (a same-host upgrade allocates nothing: the memory is the source guest's own)
    const budget = this.#options.maxRegionBytes === undefined && !h.local ? memoryBudget() : undefined;
    if (budget && h.regionBytes > budget.bytes) {
      throw new LivemigError('ERR_LIVEMIG_NO_MEMORY', `region of ${h.regionBytes} bytes exceeds what this host can hold now (${budget.bytes} bytes: ${budget.why}); set maxRegionBytes (--max-region) to override`, { phase: 'reserve' });
    }
    this.#layout = h.regions ? GuestLayout.of(h.regions) : GuestLayout.single(h.regionBytes);
    // the last check: a shared budget (a daemon's) takes the bytes, or refuses with none taken
    this.#releaseMemory = this.#options.reserveMemory?.(h.regionBytes, h.local !== undefined);
    this.#progress({ type: 'hello', region_bytes: h.regionBytes, regions: this.#regionsReport(), local: h.local !== undefined, peer: this.#peer });
    return h;
  }

  /** Reserves the region (and its image), then ACCEPT with what this side offers. */
  async reserve(h: Hello): Promise<Accepted> {
    const options = this.#options;
    const version = this.#version;
    this.#stage.enter('reserve');
    const t0 = performance.now();
    trace('receiver', 'reserving', { bytes: h.regionBytes });
    const layout = this.#layout!;
    const local = h.local !== undefined && h.capabilities.includes(CAP_LOCAL);
    const postcopyCap = !local && version >= 2 && options.postcopy !== undefined && h.capabilities.includes(CAP_POSTCOPY);
    const postcopyPlanned = postcopyCap && h.capabilities.includes(CAP_POSTCOPY_PLANNED);
    const plan = !postcopyCap ? 'no' : postcopyPlanned ? 'planned' : 'possible';
    if (local) {
      // a same-host upgrade: the source's memory itself, by reference; nothing to allocate
      // a bad offer (another host's boot id, no socket, not a socket) has reserved nothing: the
      // listener refuses this connection and listens on
      const taken = await takeMemory(h.local!, layout, options.authTimeoutMs ?? AUTH_TIMEOUT_MS).catch((e: unknown) => Promise.reject(refusedBeforeReserving(e)));
      this.#region = taken.region;
      try {
        await options.onReserved?.(taken.region, plan, layout, { files: taken.pieces.map((p) => ({ fd: p.fd, offset: p.offset })), local: true });
      } finally {
        for (const p of taken.pieces) closeFd(p.fd, 'reserve'); // the region and the guest hold their own
      }
    } else {
      // allocated off the event loop: the listener goes on answering others meanwhile
      const created = await Region.createReserved(h.regionBytes, { name: 'livemig-incoming' }).catch((e: unknown) => Promise.reject(refusedBeforeReserving(e)));
      trace('receiver', 'region allocated');
      this.#region = created;
      // Map every page now (faults are slow on VM hosts), while the integrator prepares its
      // side of the same memory: both finish before the first page is accepted.
      const populated = created.populateAsync(true);
      populated.catch(() => undefined); // awaited below, after onReserved
      await options.onReserved?.(created, plan, layout, { files: layout.regions.map((r) => ({ fd: created.fd, offset: r.firstPage * PAGE_SIZE })), local: false });
      await populated;
    }
    const region = this.#region;
    const reserveMs = performance.now() - t0;
    this.#progress({ type: 'reserved', region_bytes: region.size, reserve_ms: reserveMs });
    // a same-host upgrade receives no page: its digest is over nothing, as the source's is
    const hashes = new BigUint64Array(local ? 0 : region.pageCount);
    // Encodings (version 2): `hashes` says what each page holds from the start, all zero or
    // the kept image (whose hashes the sender receives); a dup is checked against it.
    const encodings = version >= 2 && h.capabilities.includes(CAP_ENCODINGS);
    const imageHashes = encodings && (await this.#startingImage(region, hashes));
    // capabilities exist from version 2 on (PROTOCOL.md): none is taken under version 1
    const commitActivate = version >= 2 && h.capabilities.includes(CAP_COMMIT_ACTIVATE);
    const caps = [...(local ? [CAP_LOCAL] : []), ...(encodings ? [CAP_ENCODINGS] : []), ...(imageHashes ? [CAP_IMAGE_HASHES] : []), ...(commitActivate ? [CAP_COMMIT_ACTIVATE] : []), ...(postcopyCap ? [CAP_POSTCOPY] : [])];
    // post-copy: further connections join this session with ATTACH naming its token
    // channels: further connections join this session too (ATTACH role channel)
    const channelsCap = !local && version >= 3 && h.capabilities.includes(CAP_CHANNELS) && h.channels !== undefined;
    const channels = channelsCap ? Math.min(h.channels!, maxChannels(options.maxChannels)) : 1;
    if (channelsCap) caps.push(CAP_CHANNELS);
    this.#session = postcopyCap || channels > 1 ? this.#sessions.open(region.pageCount, channels) : undefined;
    // resolve: a source that loses the link after COMMIT asks what happened (RESOLVE, token)
    const resolve = version >= 3 && h.capabilities.includes(CAP_RESOLVE);
    const token = this.#session?.token ?? (resolve ? randomBytes(16).toString('hex') : undefined);
    if (resolve) {
      caps.push(CAP_RESOLVE);
      this.#outcome = this.#outcomes.open(token!);
      // fenced while still receiving: end this migration now (its region is discarded)
      this.#outcome.onFence = () => this.#ch.abort(new LivemigError('ERR_LIVEMIG_ABORTED', 'the source resolved this session as not activated: discarded, and it will never activate', { phase: this.#stage.current }));
    }
    // the hand-over's code paths run once now, not for the first time inside the pause, and
    // before ACCEPT: a source with nothing to copy first (a same-host upgrade) pauses its guest
    // right after it, and this side's warm-up then held the CPU its wake-up was queued on
    // (0.6 ms measured with perf sched)
    warmUpRuntime();
    warmUpProtocol(version);
    await this.#ch.answerFirst(encodeAccept({ version, capabilities: caps, ...(token ? { session: token } : {}), ...(channelsCap ? { channels } : {}) }, version));
    if (imageHashes) await this.#ch.send(encodeImageHashes(hashes, version));
    return { region, hashes, encodings, commitActivate, postcopyPlanned, reserveMs, local, channels, postcopy: postcopyCap };
  }

  /** The kept image's pages and hashes, or all zero; true when the sender gets the image's hashes. */
  async #startingImage(region: Region, hashes: BigUint64Array): Promise<boolean> {
    const path = this.#options.reuseImage;
    if (path && (await loadImage(region, path, hashes))) {
      this.#progress({ type: 'image', path });
      return true;
    }
    if (path) this.#progress({ type: 'image-ignored', path, reason: `its size is not the region's ${region.size} bytes` });
    hashes.fill(call('ERR_LIVEMIG_SYSCALL', 'reserve', 'the zero page hash', () => addon.zeroPageHash()));
    return false;
  }

  /**
   * Applies frames until activation or post-copy. PAGES frames are applied natively as they
   * arrive (checked, received straight into the region, hashed); this sees the control
   * frames between them.
   */
  async receive(a: Accepted): Promise<ReceiveReport> {
    const { region, hashes } = a;
    const ch = this.#ch;
    const version = this.#version;
    const stage = this.#stage;
    stage.enter('receiving');
    const got = new Received();
    // a same-host upgrade takes no page: a page frame is refused below, never applied
    const whole: PageSink | undefined = a.local ? undefined : { region, hashes, version, encodings: a.encodings };
    if (whole && a.channels > 1) {
      const joinMs = this.#options.authTimeoutMs ?? AUTH_TIMEOUT_MS;
      const limits = frameLimits({ pageCount: region.pageCount });
      this.#channels = new IncomingChannels(a.channels, this.#session, whole, { joinMs, prepare: (c) => c.setFrameLimits(limits), version }, (e) => this.#channelFailed(e));
    }
    const striped = whole && IncomingChannels.mainSink(whole, a.channels);
    for (;;) {
      // after the extra channels ended, every page comes on this connection
      const sink = got.channelsEnded ? whole : striped;
      const f = await ch.next(undefined, stage.current === 'receiving' ? sink : undefined);
      got.pages += f.pages;
      if (f.lastRound > got.tracedRound) {
        got.tracedRound = f.lastRound;
        trace('receiver', 'round pages applied', { round: f.lastRound });
      }
      if (f.version !== version) throw new ProtocolError('ERR_LIVEMIG_VERSION', `frame of version ${f.version} after negotiating ${version}`);
      switch (f.type) {
        case FrameType.Pages:
        case FrameType.PagesEnc:
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `${FrameType[f.type]} ${a.local ? 'in a same-host upgrade, which moves no page' : 'after COMMIT'}`);
        case FrameType.RoundEnd:
          await this.#roundEnd(f, got);
          break;
        case FrameType.DeviceState:
          await this.#deviceState(f, a, got);
          break;
        case FrameType.Commit: {
          const activate = await this.#commit(f.payload, a, got);
          if (!activate) break;
          return await this.#activate(a, got); // a COMMIT with activate activates at once
        }
        case FrameType.Activate:
          return await this.#activate(a, got);
        case FrameType.Postcopy:
          return await this.#postcopy(f.payload, a, got);
        case FrameType.Abort:
          this.#sourceSaidWhy = true;
          throw new LivemigError('ERR_LIVEMIG_ABORTED', `the source aborted: ${decodeAbort(f.payload).reason}`, { phase: stage.current });
        default:
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unexpected ${FrameType[f.type]} frame while ${stage.current}`);
      }
    }
  }

  /** ROUND_END {last} on the main connection: once every extra channel has ended, all pages come here. */
  async #channelsEnded(got: Received): Promise<void> {
    if (!this.#channels || got.channelsEnded) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', this.#channels ? 'a second ROUND_END last' : 'ROUND_END last without extra channels');
    await this.#channels.ended();
    got.pages += this.#channels.pages;
    got.channelsEnded = true;
    trace('receiver', 'channels ended');
  }

  /**
   * An extra channel failed: the source hears why on the main connection (the one it reads),
   * then the main read ends with the same error and the migration is discarded.
   */
  #channelFailed(e: LivemigError): void {
    if (this.#toldSource) return;
    this.#toldSource = true;
    const phase = e.phase ?? this.#stage.current;
    void this.#ch
      .send(encodeError({ code: e.code, message: e.message, phase }, this.#version))
      .catch(() => undefined) // the main connection is gone too: the source hears that instead
      .finally(() => this.#ch.abort(e));
  }

  async #roundEnd(f: WireFrame, got: Received): Promise<void> {
    const r = decodeRoundEnd(f.payload);
    got.rounds = Math.max(got.rounds, r.round);
    // frames are applied in order, so everything before this one is in the region now
    if (f.lastRound > r.round) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `ROUND_END for round ${r.round} after pages of round ${f.lastRound}`);
    // with channels, the round is applied once every channel has passed its ROUND_END too
    await this.#channels?.reached(r.round);
    if (r.last) await this.#channelsEnded(got);
    await this.#ch.send(encodeRoundAck(r, this.#version));
    this.#progress({ type: 'round', round: r.round, pages: r.pages });
  }

  async #deviceState(f: WireFrame, a: Accepted, got: Received): Promise<void> {
    if (this.#stage.current !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'DEVICE_STATE after COMMIT');
    // once: the state the guest prepared with is the state it activates with
    if (got.deviceState !== undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'a second DEVICE_STATE');
    if (this.#channels && !got.channelsEnded) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'DEVICE_STATE before the extra channels ended (ROUND_END last on this connection)');
    const prove = (f.flags & FLAG_PROVE) !== 0;
    if (f.flags & ~FLAG_PROVE || (prove && this.#version < 3)) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `DEVICE_STATE with flags 0x${f.flags.toString(16)}, which version ${this.#version} does not define`);
    got.deviceState = f.payload; // the native reader's own buffer, made for this frame: no copy
    this.#deviceStateSeen = true;
    trace('receiver', 'DEVICE_STATE received');
    if (this.#options.prepare && !got.prepared) {
      got.prepared = this.#options.prepare(a.region, got.deviceState);
      got.prepared.catch(() => undefined); // awaited at COMMIT or POSTCOPY
    }
    // the last pages came before the device state: the digest is known while COMMIT is on its
    // way (post-copy from the start ends with a digest of its own: none is due here)
    if (!a.postcopyPlanned || prove) {
      got.digestAt = got.pages;
      got.digest = digestOf(a.hashes, 'commit');
    }
    trace('receiver', 'guest preparing, digest computed');
    // version 3: the proof that this side holds the image, computed here, before the source
    // says what its digest is (an impostor could only echo it)
    if (prove) await this.#ch.send(encodeDigest({ digest: got.digest, pageCount: a.region.pageCount }, this.#version));
  }

  /** COMMIT: the digests must match and the guest must take its state; returns whether to activate now. */
  async #commit(payload: Buffer, a: Accepted, got: Received): Promise<boolean> {
    if (this.#stage.current !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'a second COMMIT');
    trace('receiver', 'COMMIT received');
    const c = decodeCommit(payload);
    if (got.deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT before DEVICE_STATE');
    if (c.pageCount !== a.region.pageCount) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `COMMIT for ${c.pageCount} pages, region has ${a.region.pageCount}`);
    if (c.activate && !a.commitActivate) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT with activate, which was not negotiated');
    if (got.digestAt !== got.pages) got.digest = digestOf(a.hashes, 'commit');
    if (got.digest !== c.digest) {
      throw new LivemigError('ERR_LIVEMIG_DIGEST', `image digest ${got.digest.toString(16)} differs from the source's ${c.digest.toString(16)}`, { phase: 'commit' });
    }
    if (got.prepared) await got.prepared; // a state the guest refuses fails here, before commitment
    if (!c.activate) await this.#ch.send(encodeCommitAck({ digest: got.digest }, this.#version));
    this.#stage.enter('committed');
    this.#progress({ type: 'committed', digest: got.digest.toString(16) });
    return c.activate === true;
  }

  async #activate(a: Accepted, got: Received): Promise<ReceiveReport> {
    if (this.#stage.current !== 'committed') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'ACTIVATE before a matching COMMIT');
    // a session the source resolved as not activated (it lost the link) never activates
    if (this.#outcome && !this.#outcome.beginActivation()) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'this session was resolved as not activated: it is fenced and will never activate', { phase: 'activate' });
    const ta = performance.now();
    trace('receiver', 'activating');
    await this.#options.activate(a.region, got.deviceState!);
    trace('receiver', 'guest activated');
    this.#stage.enter('activated');
    this.#outcome?.settle('activated');
    const activateMs = performance.now() - ta;
    // a source that gave up waiting (and closed) before this goes out cannot hear it
    const gaveUp = this.#ch.peerGone();
    const sent = await this.#ch.send(encodeActivated({ activateMs }, this.#version)).then(
      () => true,
      () => false, // the guest runs here either way; the source will ask (RESOLVE)
    );
    trace('receiver', 'ACTIVATED sent');
    this.#progress({ type: 'activated', activate_ms: activateMs });
    // the source closes once it has read ACTIVATED: without that close it may not know, and
    // will ask on a new connection (a listener that stays up answers: activated)
    const confirmed = (await this.#ch.finish(undefined, CONFIRM_WAIT_MS)) && sent && !gaveUp;
    return { region_bytes: a.region.size, regions: this.#regionsReport(), local: a.local, reserve_ms: a.reserveMs, pages_received: got.pages, rounds: got.rounds, digest: got.digest.toString(16).padStart(16, '0'), activate_ms: activateMs, mode: 'precopy', security: this.#security, confirmed };
  }

  async #postcopy(payload: Buffer, a: Accepted, got: Received): Promise<ReceiveReport> {
    const postcopy = this.#options.postcopy;
    const session = this.#session;
    if (!postcopy || !session || !a.postcopy) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY, which was not negotiated');
    if (this.#stage.current !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `POSTCOPY while ${this.#stage.current}`);
    if (got.deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY before DEVICE_STATE');
    if (this.#outcome && !this.#outcome.beginActivation()) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'this session was resolved as not activated: it is fenced and will never run here', { phase: 'activate' });
    return runPostcopy(
      {
        ch: this.#ch,
        payload,
        region: a.region,
        hashes: a.hashes,
        deviceState: got.deviceState,
        version: this.#version,
        session,
        options: { ...this.#options, postcopy },
        progress: this.#progress,
        onRunning: () => {
          this.#stage.enter('postcopy');
          this.#outcome?.settle('activated');
        },
        onFaults: (s) => (this.#faults = s),
      },
      { region_bytes: a.region.size, regions: this.#regionsReport(), local: false, reserve_ms: a.reserveMs, pages_received: got.pages, rounds: got.rounds, security: this.#security },
    );
  }

  /**
   * A failure: the source hears why (unless it said so itself), and before activation the
   * region is discarded. In post-copy the guest runs here on whatever pages it has: it stays.
   */
  async discard(e: unknown): Promise<LivemigError> {
    const failedIn = this.#stage.fail();
    if (failedIn !== 'activated' && failedIn !== 'postcopy') this.#outcome?.settle('fenced');
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_ABORTED', `receive failed while ${failedIn}: ${(e as Error).message}`, { phase: failedIn, cause: e });
    if (failedIn === 'hello') refusedBeforeReserving(err);
    if (this.#deviceStateSeen && !this.#sourceSaidWhy && failedIn !== 'postcopy') markMayBeAskedAbout(err);
    const tell = !this.#ch.closed && !this.#toldSource && err.code !== 'ERR_LIVEMIG_ABORTED' && failedIn !== 'postcopy';
    await this.#ch.finish(tell ? encodeError({ code: err.code, message: err.message, phase: err.phase ?? failedIn }, this.#version) : undefined);
    if (this.#faults && failedIn !== 'postcopy') this.#faults.stop();
    if (this.#region && failedIn !== 'activated' && failedIn !== 'postcopy') {
      this.#options.onDiscard?.(this.#region);
      this.#region.release(); // nothing was activated: the destination copy is discarded
    }
    return err;
  }

  /**
   * Ends this migration from here (a daemon shutting down), but only before the device state
   * came: the source has not paused its guest, let alone committed, and resumes nothing. Later
   * the pause is short and a COMMIT may be on its way: that migration is left to finish.
   */
  abortBeforeDeviceState(reason: LivemigError): boolean {
    const s = this.#stage.current;
    if (this.#deviceStateSeen || (s !== 'hello' && s !== 'reserve' && s !== 'receiving')) return false;
    this.#ch.abort(reason);
    return true;
  }

  endSession(): void {
    this.#releaseMemory?.();
    this.#releaseMemory = undefined;
    this.#channels?.close();
    if (this.#session) this.#sessions.end(this.#session);
  }
}

/** What arrived so far. */
class Received {
  pages = 0;
  rounds = 0;
  deviceState: Buffer | undefined;
  prepared: Promise<void> | undefined;
  digest = 0n;
  /** `pages` when `digest` was computed (-1: not yet) */
  digestAt = -1;
  /** the last round whose pages were traced as applied */
  tracedRound = -1;
  /** the extra channels (if any) ended: every page comes on the main connection now */
  channelsEnded = false;
}
