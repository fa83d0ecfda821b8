/**
 * The destination side: validate, reserve, apply, verify, commit, activate.
 *   hello -> reserve -> receiving -> committed -> activated
 * Nothing is activated before a matching commitment digest and the sender's ACTIVATE; any
 * failure before that discards the region. Every frame is checked before it is used.
 */
import { trace } from '../trace.js';
import { warmUpRuntime } from '../warmup.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, callAsync } from '../native.js';
import { WireChannel, type PageSink } from '../protocol/wire.js';
import { CAP_COMMIT_ACTIVATE, CAP_ENCODINGS, CAP_IMAGE_HASHES, CAP_POSTCOPY, CAP_POSTCOPY_PLANNED, FrameType, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION } from '../protocol/format.js';
import { type Frame } from '../protocol/frame.js';
import { bytesToBitmap, decodeAbort, decodeAttach, decodeCommit, decodeHello, decodePostcopy, decodeRoundEnd, encodeAccept, encodeActivated, encodeAttached, encodeCommitAck, encodeError, encodeImageHashes, encodePostcopyRunning, encodeRoundAck, negotiateVersion, type Attach } from '../protocol/messages.js';
import { open } from 'node:fs/promises';
import { ProtocolError } from '../protocol/errors.js';
import { PAGE_SIZE, Region } from '../region/region.js';
import { randomBytes } from 'node:crypto';
import { FaultService, type FaultStats } from '../postcopy/dest.js';

export type ReceiverState = 'hello' | 'reserve' | 'receiving' | 'committed' | 'activated' | 'postcopy' | 'failed';

export type ReceiveProgress =
  | { type: 'reserved'; region_bytes: number; reserve_ms: number }
  | { type: 'image'; path: string }
  | { type: 'image-ignored'; path: string; reason: string }
  | { type: 'round'; round: number; pages: number }
  | { type: 'committed'; digest: string }
  | { type: 'activated'; activate_ms: number }
  | { type: 'postcopy-running'; activate_ms: number; pages_needed: number }
  | { type: 'postcopy-disconnected'; message: string }
  | { type: 'postcopy-reconnected'; pages_held: number }
  | ({ type: 'postcopy-progress' } & FaultStats);

export interface ReceiveOptions {
  /** refuse regions larger than this (default: what the host's memory allows) */
  maxRegionBytes?: number;
  /**
   * called once the region is reserved, while its pages are being mapped and before any page
   * arrives: start the destination guest warm here; the handshake waits for the promise
   */
  onReserved?(region: Region, postcopy: 'planned' | 'possible' | 'no'): void | Promise<void>;
  /** called when the migration fails before activation (undo what onReserved started) */
  onDiscard?(region: Region): void;
  /** hands the verified region and device state to the guest; the guest runs here from then on */
  activate(region: Region, deviceState: Buffer): Promise<void>;
  /**
   * called as soon as the device state arrives, before the source commits: load and check it so
   * that `activate` only has to start the guest. A rejection fails the migration while the
   * source can still resume its guest.
   */
  prepare?(region: Region, deviceState: Buffer): Promise<void>;
  onProgress?(event: ReceiveProgress): void;
  /**
   * an older image of the region this host kept (a file of exactly the region's size, e.g.
   * from a guest that left): its pages are loaded first and the sender sends only what differs
   */
  reuseImage?: string;
  /** time allowed between frames before giving up (default 60 s) */
  idleTimeoutMs?: number;
  /**
   * Post-copy support (capability `postcopy`): register the guest's mapping of the region for
   * minor faults (userfaultfd, UFFD_FEATURE_MINOR_SHMEM) before it resumes, and return the
   * userfaultfd (a descriptor in this process) and the mapping's address in the guest.
   * `activate` then resumes the guest with pages still missing; they arrive while it runs.
   */
  postcopy?: { register(region: Region): Promise<{ uffd: number; address: bigint }> };
  /** post-copy: how long to wait for the source to come back after a break (default 60 s) */
  recoverTimeoutMs?: number;
  /** @internal set by listen(): routes ATTACH connections of a post-copy session here */
  sessions?: Map<string, (ch: WireChannel, a: Attach) => void>;
}

export interface ReceiveReport {
  region_bytes: number;
  reserve_ms: number;
  pages_received: number;
  rounds: number;
  digest: string;
  activate_ms: number;
  mode: 'precopy' | 'postcopy';
  postcopy?: FaultStats & { pages_needed: number; total_ms: number; reconnects: number };
}

/** Serves one migration on an accepted connection. */
export async function receiveOn(socket: net.Socket, options: ReceiveOptions): Promise<ReceiveReport> {
  const progress = options.onProgress ?? (() => undefined);
  const idle = options.idleTimeoutMs ?? 60_000;
  const ch = WireChannel.fromSocket(socket);
  ch.setIdleTimeout(idle); // a peer silent this long is gone
  let state: ReceiverState = 'hello';
  let version = PROTOCOL_VERSION;
  let region: Region | undefined;
  let sessions: Map<string, (ch: WireChannel, a: Attach) => void> | undefined;
  let sessionKey = '';
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

    state = 'reserve';
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
        hashes.fill(addon.zeroPageHash());
      }
    }
    const commitActivate = h.capabilities.includes(CAP_COMMIT_ACTIVATE);
    const caps = [...(encodings ? [CAP_ENCODINGS] : []), ...(imageHashes ? [CAP_IMAGE_HASHES] : []), ...(commitActivate ? [CAP_COMMIT_ACTIVATE] : []), ...(postcopyCap ? [CAP_POSTCOPY] : [])];
    // post-copy: further connections join this session with ATTACH naming the token
    const session = postcopyCap ? randomBytes(16).toString('hex') : undefined;
    const attached: { push?: WireChannel; prio?: WireChannel; wake?: () => void } = {};
    if (session && options.sessions) {
      sessions = options.sessions;
      sessionKey = session;
      options.sessions.set(session, (c, a) => {
        attached[a.role]?.close(); // a newer connection for the same role replaces an older one
        attached[a.role] = c;
        attached.wake?.();
      });
    }
    // the post-copy page table, touched now so that the switch does not fault its memory in
    const neededTable = session ? new Uint8Array(region.pageCount).fill(1) : undefined;
    await ch.send(encodeAccept({ version, capabilities: caps, ...(session ? { session } : {}) }, version));
    if (imageHashes) await ch.send(encodeImageHashes(hashes, version));
    // the hand-over's code paths run once now, not for the first time inside the pause
    warmUpRuntime();
    warmUpProtocol(version);

    state = 'receiving';
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
      const f = await ch.next(undefined, state === 'receiving' ? sink : undefined);
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
          if (state !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'DEVICE_STATE after COMMIT');
          deviceState = Buffer.from(f.payload);
          trace('receiver: DEVICE_STATE received');
          if (options.prepare && !prepared) {
            prepared = options.prepare(region, deviceState);
            prepared.catch(() => undefined); // awaited at COMMIT or POSTCOPY
          }
          // the last pages came before the device state: the digest is known while COMMIT is on its
          // way (post-copy from the start ends with a digest of its own: none is due here)
          if (!postcopyPlanned) {
            digestAt = pagesReceived;
            digest = addon.digestTable(hashes);
          }
          trace('receiver: guest preparing, digest computed');
          break;
        case FrameType.Commit: {
          if (state !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'a second COMMIT');
          trace('receiver: COMMIT received');
          const c = decodeCommit(f.payload);
          if (deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT before DEVICE_STATE');
          if (c.pageCount !== region.pageCount) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `COMMIT for ${c.pageCount} pages, region has ${region.pageCount}`);
          if (digestAt !== pagesReceived) digest = addon.digestTable(hashes);
          if (digest !== c.digest) {
            throw new LivemigError('ERR_LIVEMIG_DIGEST', `image digest ${digest.toString(16)} differs from the source's ${c.digest.toString(16)}`, { phase: 'commit' });
          }
          if (c.activate && !commitActivate) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'COMMIT with activate, which was not negotiated');
          if (prepared) await prepared; // a state the guest refuses fails here, before commitment
          if (!c.activate) await ch.send(encodeCommitAck({ digest }, version));
          state = 'committed';
          progress({ type: 'committed', digest: digest.toString(16) });
          if (!c.activate) break;
        }
        // falls through: a COMMIT with activate activates at once
        case FrameType.Activate: {
          if (state !== 'committed') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'ACTIVATE before a matching COMMIT');
          const ta = performance.now();
          trace('receiver: activating');
          await options.activate(region, deviceState!);
          trace('receiver: guest activated');
          state = 'activated';
          const activateMs = performance.now() - ta;
          await ch.send(encodeActivated({ activateMs }, version)).catch(() => undefined); // the guest runs here either way
          trace('receiver: ACTIVATED sent');
          progress({ type: 'activated', activate_ms: activateMs });
          await ch.finish();
          return { region_bytes: region.size, reserve_ms: reserveMs, pages_received: pagesReceived, rounds, digest: digest.toString(16).padStart(16, '0'), activate_ms: activateMs, mode: 'precopy' };
        }
        case FrameType.Postcopy: {
          if (!postcopyCap || !options.postcopy) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY, which was not negotiated');
          if (state !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `POSTCOPY while ${state}`);
          if (deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY before DEVICE_STATE');
          trace('receiver: POSTCOPY received');
          // the priority connection's ATTACH travels on its own stream: it may not be read yet
          const prio = await attachedPrio(attached, PRIO_ATTACH_WAIT_MS);
          const unpacked = addon.unpackBits(decodePostcopy(f.payload, region.pageCount).needed, region.pageCount, neededTable);
          const needed = unpacked.bytes;
          const pagesNeeded = unpacked.set;
          // From here the guest runs here: the source never resumes it (point of commitment).
          const ta = performance.now();
          const reg = await options.postcopy.register(region);
          trace('receiver: registered');
          faults = new FaultService(region, reg.uffd, reg.address, needed, hashes, version);
          faults.start();
          faults.attach(ch.fd, prio.fd);
          prio.handOff();
          attached.prio = undefined;
          trace('receiver: fault service started');
          await options.activate(region, deviceState);
          trace('receiver: guest activated (post-copy)');
          state = 'postcopy';
          const activateMs = performance.now() - ta;
          await ch.send(encodePostcopyRunning({ activateMs }, version));
          progress({ type: 'postcopy-running', activate_ms: activateMs, pages_needed: pagesNeeded });
          const tRun = performance.now();
          const reconnects = await servePostcopy(faults, attached, region, version, options, progress);
          const fs = faults.stats();
          // the thread stops by itself once every page is mapped into the guest
          await faults.done;
          faults.stop(); // joins the finished thread
          addon.closeFd(reg.uffd); // our copy of the guest's userfaultfd (the guest keeps its own)
          ch.handOff();
          return {
            region_bytes: region.size,
            reserve_ms: reserveMs,
            pages_received: pagesReceived + fs.pages_pulled + fs.pages_pushed,
            rounds,
            digest: (await faults.complete).toString(16).padStart(16, '0'),
            activate_ms: activateMs,
            mode: 'postcopy',
            postcopy: { ...fs, pages_needed: pagesNeeded, total_ms: +(performance.now() - tRun).toFixed(1), reconnects },
          };
        }
        case FrameType.Abort:
          throw new LivemigError('ERR_LIVEMIG_ABORTED', `the source aborted: ${decodeAbort(f.payload).reason}`, { phase: state });
        default:
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unexpected ${FrameType[f.type]} frame while ${state}`);
      }
    }
  } catch (e) {
    const failedIn = state;
    state = 'failed';
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
    if (sessions) sessions.delete(sessionKey);
  }
}

/**
 * Waits for post-copy to complete; after a break, for the source to attach again (both
 * connections), then tells it what this side holds. Resolves with the number of reconnections.
 */
async function servePostcopy(faults: FaultService, attached: { push?: WireChannel; prio?: WireChannel; wake?: () => void }, region: Region, version: number, options: ReceiveOptions, progress: (e: ReceiveProgress) => void): Promise<number> {
  let reconnects = 0;
  let broken: string | undefined;
  let wake: (() => void) | undefined;
  const off = faults.on((e) => {
    if (e.type === 'disconnected') broken = e.message ?? 'the link broke';
    wake?.();
  });
  attached.wake = () => wake?.();
  let done = false;
  faults.complete.then(
    () => ((done = true), wake?.()),
    () => wake?.(),
  );
  const timer = setInterval(() => progress({ type: 'postcopy-progress', ...faults.stats() }), 1000);
  try {
    for (;;) {
      if (done) return reconnects;
      await Promise.race([faults.complete, new Promise<void>((r) => (wake = r))]);
      if (done) return reconnects;
      if (broken === undefined) continue;
      progress({ type: 'postcopy-disconnected', message: broken });
      const deadline = performance.now() + (options.recoverTimeoutMs ?? 60_000);
      while (!(attached.push && attached.prio)) {
        const left = deadline - performance.now();
        if (left <= 0) {
          const held = faults.heldCount();
          throw new LivemigError('ERR_LIVEMIG_SOURCE_LOST', `the source did not come back within ${options.recoverTimeoutMs ?? 60_000} ms (${broken}); ${region.pageCount - held} pages exist only there, so the guest here cannot finish`, { phase: 'postcopy' });
        }
        await new Promise<void>((r) => {
          wake = r;
          setTimeout(r, Math.min(left, 1000));
        });
      }
      broken = undefined;
      const held = faults.held();
      const prio = attached.prio;
      const push = attached.push;
      attached.prio = attached.push = undefined;
      await prio.send(encodeAttached({ held: bytesToBitmap(held) }, version));
      faults.attach(push.fd, prio.fd);
      push.handOff();
      prio.handOff();
      reconnects++;
      progress({ type: 'postcopy-reconnected', pages_held: faults.heldCount() });
    }
  } finally {
    clearInterval(timer);
    off();
  }
}

export interface Receiver {
  readonly port: number;
  readonly address: string;
  /** the next migration's outcome */
  next(): Promise<ReceiveReport>;
  close(): Promise<void>;
}

/** Listens and serves migrations one at a time. */
export async function listen(host: string, port: number, options: ReceiveOptions): Promise<Receiver> {
  // pauseOnConnect: Node must not read from the connection before the native wire owns it
  const server = net.createServer({ noDelay: true, pauseOnConnect: true });
  const results: { resolve: (r: ReceiveReport) => void; reject: (e: unknown) => void }[] = [];
  const ready: Promise<ReceiveReport>[] = [];
  let busy = false;
  const sessions = new Map<string, (ch: WireChannel, a: Attach) => void>();
  options = { ...options, sessions };
  server.on('connection', (socket) => {
    if (busy) {
      // one migration at a time; another connection may only join its post-copy session
      void routeAttach(socket, sessions);
      return;
    }
    busy = true;
    const p = receiveOn(socket, options).finally(() => {
      busy = false;
    });
    p.catch(() => undefined);
    const waiter = results.shift();
    if (waiter) p.then(waiter.resolve, waiter.reject);
    else ready.push(p);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot listen on ${host}:${port}: ${e.message}`, { phase: 'listen', cause: e })));
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  return {
    port: addr.port,
    address: addr.address,
    next: () => ready.shift() ?? new Promise((resolve, reject) => results.push({ resolve, reject })),
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/** A connection while a migration runs: its first frame must be ATTACH naming a live session. */
async function routeAttach(socket: net.Socket, sessions: Map<string, (ch: WireChannel, a: Attach) => void>): Promise<void> {
  let ch: WireChannel;
  try {
    ch = WireChannel.fromSocket(socket);
  } catch {
    socket.destroy();
    return;
  }
  try {
    const f = await ch.next(5_000);
    if (f.type !== FrameType.Attach) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `a second connection must start with ATTACH, got ${FrameType[f.type] ?? f.type}`);
    const a = decodeAttach(f.payload);
    const join = sessions.get(a.session);
    if (!join) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'ATTACH names no session running here', { phase: 'attach' });
    join(ch, a);
  } catch (e) {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_PROTOCOL', (e as Error).message, { phase: 'attach', cause: e });
    await ch.finish(ch.closed ? undefined : encodeError({ code: err.code, message: err.message, phase: 'attach' }, PROTOCOL_VERSION));
  }
}

/**
 * Loads a kept image into a freshly reserved region and hashes it. An image of another size
 * is not this region's: it is ignored (every page is sent), never partly applied.
 */
async function loadImage(region: Region, path: string, hashes: BigUint64Array): Promise<boolean> {
  const fh = await open(path, 'r').catch((e: unknown) => {
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `cannot open the reuse image ${path}: ${(e as Error).message}`, { phase: 'reserve', cause: e });
  });
  try {
    const st = await fh.stat();
    if (st.size !== region.size) return false;
    const view = region.view(0, region.size);
    for (let off = 0; off < region.size; ) {
      const { bytesRead } = await fh.read(view, off, Math.min(64 << 20, region.size - off), off);
      if (bytesRead === 0) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `the reuse image ${path} ended early`, { phase: 'reserve' });
      off += bytesRead;
    }
  } finally {
    await fh.close();
  }
  await callAsync('ERR_LIVEMIG_SYSCALL', 'reserve', 'hashing the reuse image', () => addon.hashAll(region.nativeHandle, hashes));
  return true;
}

const PRIO_ATTACH_WAIT_MS = 5_000;

/** The session's priority connection, once its ATTACH has been read (it races POSTCOPY). */
async function attachedPrio(attached: { prio?: WireChannel; wake?: () => void }, ms: number): Promise<WireChannel> {
  const deadline = performance.now() + ms;
  while (!attached.prio) {
    const left = deadline - performance.now();
    if (left <= 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `POSTCOPY, but no priority connection attached within ${ms} ms`);
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, left);
      attached.wake = () => (clearTimeout(t), resolve());
    });
  }
  return attached.prio;
}
