/**
 * The source side of a migration: Clark's stages as an explicit state machine.
 *   handshake -> precopy (rounds) -> stop-and-copy -> commit -> activate -> done
 * Before ACTIVATE is sent, any failure aborts: the destination discards its copy and the guest
 * resumes here. After ACTIVATE is sent and before ACTIVATED arrives, the outcome is unknown:
 * the source stays paused (never released, never resumed) and the error says so.
 */
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { trace } from '../trace.js';
import { warmUpRuntime } from '../warmup.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import { addon } from '../native.js';
import { WireChannel, type NativeDedup } from '../protocol/wire.js';
import { PageEncoder } from '../encoding/encoder.js';
import { FrameType, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, type Frame } from '../protocol/frame.js';
import {
  decodeAccept,
  decodeActivated,
  decodeCommitAck,
  decodeImageHashes,
  CAP_COMMIT_ACTIVATE,
  CAP_ENCODINGS,
  CAP_IMAGE_HASHES,
  CAP_POSTCOPY,
  CAP_POSTCOPY_PLANNED,
  decodeError,
  decodeRoundAck,
  encodeAbort,
  encodeActivate,
  encodeCommit,
  encodeDeviceState,
  encodeHello,
  encodeRoundEnd,
} from '../protocol/messages.js';
import { chooseTracker } from '../tracking/probe.js';
import type { DirtyTracker } from '../tracking/types.js';
import { UffdAsyncTracker } from '../tracking/uffd-async.js';
import { firstOutOfOrder, mergePages } from './batches.js';
import { RateMeter, TokenBucket } from './bandwidth.js';
import { ConvergencePolicy, type StallAction } from './policy.js';
import type { MigrateOptions, MigrationReport, RoundStats } from './types.js';
import { WritableWorkingSet } from './wws.js';
import { attachConnection, runPostcopy, type PostcopyLink } from '../postcopy/switch.js';
import { PageServer } from '../postcopy/source.js';

const STALL_ACTIONS: readonly StallAction[] = ['throttle', 'postcopy', 'force', 'abort'];
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

type SenderState = 'connecting' | 'handshake' | 'precopy' | 'stop-and-copy' | 'commit' | 'activating' | 'postcopy' | 'done' | 'failed';
const MODES = ['precopy', 'postcopy', 'hybrid'] as const;

/**
 * Cost of the pause besides moving pages, ms: the integrator's pause (~2 ms for the reference
 * guest), the final collect (~0.5), the commit round trip with both digests (~2-4) and the
 * activation round trip (~2-5), as measured by bench/e2e on a 2-vCPU host.
 */
const FIXED_STOP_COST_MS = 8;

/**
 * Longest a round after the first runs, with the throttle stall policy, before the rest of its
 * pages wait for the next: through 1 Gbit/s a pass over 1 GiB takes ~9 s, and a policy that
 * acts once a round would step the throttle once every 9 s while the guest dirties the region
 * again.
 */
const ROUND_BUDGET_MS = 1000;

const now = (): number => performance.now();

/** Errors the destination reported itself: it says it did not (and will not) activate. */
const reportedByPeer = new WeakSet<Error>();

function peerError(f: Frame, phase: string): LivemigError {
  try {
    const e = decodeError(f.payload);
    const code = e.code === 'ERR_LIVEMIG_NO_MEMORY' || e.code === 'ERR_LIVEMIG_VERSION' || e.code === 'ERR_LIVEMIG_DIGEST' ? e.code : 'ERR_LIVEMIG_REFUSED';
    const err = new LivemigError(code, `destination: ${e.code}: ${e.message}`, { phase });
    reportedByPeer.add(err);
    return err;
  } catch (err) {
    return err as LivemigError;
  }
}

async function connect(to: MigrateOptions['to']): Promise<net.Socket> {
  if (to instanceof net.Socket) return to;
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: to.host, port: to.port });
    s.once('connect', () => resolve(s));
    s.once('error', (e) => reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot connect to ${to.host}:${to.port}: ${e.message}`, { phase: 'connect', cause: e })));
  });
}

export async function migrate(options: MigrateOptions): Promise<MigrationReport> {
  const { region } = options;
  const downtimeLimitMs = options.downtimeLimitMs ?? 50;
  const maxRounds = options.maxRounds ?? 30;
  const maxBytes = options.maxBytes ?? 3 * region.size;
  const onStall: StallAction = options.onStall ?? (options.throttle ? 'throttle' : 'force');
  const batchPages = Math.max(1, Math.floor((options.batchBytes ?? 1 << 20) / region.pageSize));
  const invalid = (m: string): LivemigError => new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', m, { phase: 'validate' });
  if (!(downtimeLimitMs > 0)) throw invalid('downtimeLimitMs must be a positive number');
  if (!Number.isInteger(maxRounds) || maxRounds < 1) throw invalid('maxRounds must be a positive integer');
  if (!(maxBytes > 0)) throw invalid('maxBytes must be a positive number');
  if (batchPages > 4096) throw invalid('batchBytes must be at most 4096 pages');
  if (!STALL_ACTIONS.includes(onStall)) throw invalid(`onStall must be one of ${STALL_ACTIONS.join(', ')}, got ${String(onStall)}`);
  if (onStall === 'throttle' && !options.throttle) throw invalid("onStall 'throttle' needs a throttle(percent) callback to slow the guest");
  if (options.bandwidthMiBps !== undefined && !(options.bandwidthMiBps > 0)) throw invalid('bandwidthMiBps must be a positive number');
  if (options.deadlineMs !== undefined && !(options.deadlineMs > 0)) throw invalid('deadlineMs must be a positive number');
  const mode = options.mode ?? 'precopy';
  if (!MODES.includes(mode)) throw invalid(`mode must be one of ${MODES.join(', ')}, got ${String(mode)}`);
  if (options.recoverTimeoutMs !== undefined && !(options.recoverTimeoutMs > 0)) throw invalid('recoverTimeoutMs must be a positive number');
  const mayPostcopy = mode !== 'precopy' || onStall === 'postcopy' || options.control !== undefined;
  const ra = options.rateAdaptation;
  if (ra && !(ra.startMiBps > 0 && ra.incrementMiBps >= 0)) throw invalid('rateAdaptation needs startMiBps > 0 and incrementMiBps >= 0');

  let state: SenderState = 'connecting';
  let paused = false;
  let channel: WireChannel | undefined;
  let bytesSent = 0;
  let encoder: PageEncoder | undefined;
  let pagesSent = 0;
  let tracker: DirtyTracker | undefined = options.tracker;
  let unsubscribe: (() => void) | undefined;
  let throttled = false;
  let trackerReason = 'given by the caller';
  const progress = options.onProgress ?? (() => undefined);
  /** Pauses the guest for the switch; returns its device state. */
  const pauseGuest = async (): Promise<Uint8Array> => {
    try {
      const deviceState = await options.pause();
      paused = true;
      return deviceState;
    } catch (e) {
      paused = true; // a pause that failed half-way must still be undone
      throw new LivemigError('ERR_LIVEMIG_GUEST', `pausing the guest failed: ${(e as Error).message}`, { phase: 'stop-and-copy', cause: e });
    }
  };

  try {
    const tConnect = now();
    // Map the guest's pages into our own mapping while the destination reserves: reading
    // through unmapped pages would fault once per page in the middle of the first round.
    const populated = region.populateAsync(false);
    populated.catch(() => undefined);
    channel = WireChannel.fromSocket(await connect(options.to));
    // frames from the destination are read as they come, so an ERROR it sends while we are
    // busy sending pages explains the failure instead of a bare connection reset
    channel.readAhead();
    state = 'handshake';
    const enc = { zero: options.encodings?.zero ?? true, dedup: options.encodings?.dedup ?? true, compress: options.encodings?.compress ?? true };
    const wantEncodings = enc.zero || enc.dedup || enc.compress;
    await channel.send(encodeHello({ versions: [MIN_PROTOCOL_VERSION, PROTOCOL_VERSION], regionBytes: region.size, pageSize: region.pageSize, auth: null, capabilities: [...(wantEncodings ? [CAP_ENCODINGS] : []), CAP_COMMIT_ACTIVATE, ...(mayPostcopy ? [CAP_POSTCOPY] : []), ...(mode !== 'precopy' ? [CAP_POSTCOPY_PLANNED] : [])] }));
    const accept = decodeAccept((await channel.expect(FrameType.Accept, (f) => peerError(f, 'handshake'), options.handshakeTimeoutMs ?? 60_000)).payload);
    if (accept.version < MIN_PROTOCOL_VERSION || accept.version > PROTOCOL_VERSION) {
      throw new LivemigError('ERR_LIVEMIG_VERSION', `destination chose protocol version ${accept.version}, outside ${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION}`, { phase: 'handshake' });
    }
    const version = accept.version;
    // the hand-over's code paths run once now, not for the first time inside the pause
    warmUpRuntime();
    warmUpProtocol(version);
    const link: PostcopyLink | undefined =
      accept.capabilities.includes(CAP_POSTCOPY) && accept.session
        ? { session: accept.session, version, connect: options.connect ?? (() => connect(options.to instanceof net.Socket ? (() => { throw invalid('post-copy needs `connect` (a way to open more connections) when `to` is a socket'); })() : options.to)) }
        : undefined;
    if (mode !== 'precopy' && !link) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `mode ${mode}: the destination does not offer post-copy`, { phase: 'handshake' });
    // Encodings: both sides start the dedup index from what the destination holds, a fresh
    // (all-zero) region or the image whose hashes it sends now.
    let dedup: NativeDedup | undefined;
    if (wantEncodings && version >= 2 && accept.capabilities.includes(CAP_ENCODINGS)) {
      dedup = new addon.Dedup(region.pageCount);
      const image = accept.capabilities.includes(CAP_IMAGE_HASHES)
        ? decodeImageHashes((await channel.expect(FrameType.ImageHashes, (f) => peerError(f, 'handshake'), options.handshakeTimeoutMs ?? 60_000)).payload, region.pageCount)
        : new BigUint64Array(region.pageCount).fill(addon.zeroPageHash());
      dedup.initImage(image);
    }
    // per-page tables and the encoder are set up (first touch included) while the destination
    // reserves: in the first round they would take the CPU from the guest and the round
    const hashes = new BigUint64Array(region.pageCount).fill(0n);
    encoder = dedup ? new PageEncoder(region, channel, hashes, dedup, enc, version, batchPages, () => tracker?.writtenProbe?.()) : undefined;
    await Promise.all([populated, encoder?.prepare()]);
    const prepMs = now() - tConnect;
    if (!tracker) {
      const choice = chooseTracker(region, options.target ? { target: options.target } : {});
      tracker = choice.tracker;
      trackerReason = `${choice.backend}: ${choice.reason}`;
    }
    progress({ type: 'handshake', prep_ms: prepMs, version, tracker: tracker.backend, tracker_reason: trackerReason });

    // Arm tracking before the first page is read: a write after this is caught by a later round.
    // (post-copy from the start has no rounds: nothing to track)
    if (mode !== 'postcopy') await tracker.start();
    const ch = channel;
    const pageEncoder = encoder;
    const sendPages = async (r: number, pages: Uint32Array, final: boolean): Promise<number> => {
      const n = pageEncoder ? await pageEncoder.send(r, pages, final) : (await ch.sendPages(region, pages, r, version, batchPages, hashes)).bytes;
      bytesSent += n;
      pagesSent += pages.length;
      return n;
    };
    state = 'precopy';
    const tFirstPage = now();
    const perRound: RoundStats[] = [];
    const policy = new ConvergencePolicy({ downtimeLimitMs, maxRounds, maxBytes, onStall, fixedCostMs: FIXED_STOP_COST_MS, ...(options.deadlineMs !== undefined ? { deadlineMs: options.deadlineMs } : {}) });
    const wws = options.wws === false ? undefined : new WritableWorkingSet(region.pageCount);
    const meter = new RateMeter(1000);
    const lightMeter = new RateMeter(1000);
    // Bandwidth: the user's cap (changeable while running) and, with rate adaptation, a limit
    // per round; the lower one is enforced by a token bucket between chunks of ~20 ms.
    let capMiBps = options.control?.bandwidth ?? options.bandwidthMiBps;
    let roundLimitMiBps = ra?.startMiBps;
    let bucket: TokenBucket | undefined;
    const applyCap = (): void => {
      const limits = [capMiBps, roundLimitMiBps].filter((x): x is number => x !== undefined);
      if (limits.length === 0) bucket = undefined;
      else if (bucket) bucket.setRate(Math.min(...limits) * 2 ** 20, now());
      else bucket = new TokenBucket(Math.min(...limits) * 2 ** 20, now());
    };
    applyCap();
    unsubscribe = options.control?.onBandwidth((m) => {
      capMiBps = m;
      applyCap();
    });
    const deadlineAt = options.deadlineMs !== undefined ? tConnect + options.deadlineMs : undefined;
    /** Sends a round's pages in chunks, paced by the bucket; stops early if the deadline nears. */
    const sendRound = async (r: number, pages: Uint32Array, final = false, budgetMs?: number): Promise<{ bytes: number; unsent: Uint32Array }> => {
      // a page listed twice would be refused by the destination; say which list broke the rule
      const bad = firstOutOfOrder(pages);
      if (bad >= 0) throw new LivemigError('ERR_LIVEMIG_STATE', `internal: the page list of round ${r} is not ascending at ${bad} (${pages[bad - 1]}, ${pages[bad]})`, { phase: final ? 'stop-and-copy' : 'precopy' });
      let bytes = 0;
      let at = 0;
      let tRoundStart: number | undefined;
      while (at < pages.length) {
        const rate = bucket?.bytesPerSecond;
        // chunks where the round may have to stop early: at a deadline, or at the byte bound
        const mayCross = !final && bytesSent + (pages.length - at) * region.pageSize > maxBytes;
        const chunk = rate !== undefined ? Math.max(batchPages, Math.floor((rate * 0.02) / region.pageSize)) : deadlineAt !== undefined || mayCross || budgetMs !== undefined ? 16 * batchPages : pages.length;
        const part = pages.subarray(at, at + chunk);
        const t0 = now();
        tRoundStart ??= t0;
        const b = await sendPages(r, part, final);
        const t1 = now();
        // the link's rate shows in chunks that were mostly page bodies; chunks of skipped and
        // zero pages measure the CPU, and would make the estimate for raw dirty pages too low
        (b >= 0.5 * part.length * region.pageSize ? meter : lightMeter).add(t1, b, t1 - t0);
        bytes += b;
        at += part.length;
        if (bucket) {
          const wait = bucket.take(b, now());
          if (wait > 0) await sleep(wait);
        }
        // the byte bound holds within a round too: the rest goes at the stop (the policy stops now)
        if (!final && bytesSent >= maxBytes && at < pages.length) break;
        // a long round ends early (the rest joins the next one), so that the policy sees the
        // guest's dirtying rate and can act every second, not once per slow pass
        if (budgetMs !== undefined && at < pages.length && now() - tRoundStart >= budgetMs) break;
        // leave the rest to the stop-and-copy (or to giving up) rather than run out of time
        if (deadlineAt !== undefined && !final && at < pages.length) {
          const mbps = meter.mbps() ?? lightMeter.mbps() ?? 1;
          if (now() + ((pages.length - at) * region.pageSize) / 1e3 / mbps > deadlineAt - 2 * downtimeLimitMs) break;
        }
      }
      return { bytes, unsent: pages.subarray(at) };
    };
    let pending: Uint32Array = Uint32Array.from({ length: region.pageCount }, (_, i) => i);
    let round = 1;
    let stopReason = '';
    let forcedStop = false;
    let maxThrottle = 0;
    let switchToPostcopy = mode === 'postcopy';
    for (; !switchToPostcopy; ) {
      const t0 = now();
      // after the first pass (which must send everything anyway), a round expected to take
      // longer than ROUND_BUDGET_MS is cut there, for the throttle's sake. Only then: the other
      // stall actions judge a round by how far it shrank what is left, which a cut round does
      // not show (a guest that would converge over whole rounds would be forced, moved or given up)
      const knownMbps = round > 1 && onStall === 'throttle' ? meter.mbps() ?? lightMeter.mbps() : undefined;
      const long = knownMbps !== undefined && (pending.length * region.pageSize) / 1e3 / knownMbps > ROUND_BUDGET_MS;
      const { bytes, unsent } = await sendRound(round, pending, false, long ? ROUND_BUDGET_MS : undefined);
      const sentPages = pending.length - unsent.length;
      await channel.send(encodeRoundEnd({ round, pages: sentPages }, version));
      const duration = now() - t0;
      const dirty = await tracker.collect();
      wws?.record(dirty);
      const due = unsent.length > 0 ? mergePages(dirty, unsent) : dirty;
      const plan = wws ? wws.plan(due) : { send: due, held: 0 };
      const roundMbps = bytes / 1e3 / Math.max(duration, 0.001); // bytes/ms / 1e3 = MB/s
      const bandwidth = meter.mbps() ?? lightMeter.mbps() ?? roundMbps;
      const d = policy.decide({
        round,
        pagesSent: sentPages,
        bytesSent: bytes,
        durationMs: duration,
        dirtyPages: plan.send.length,
        dirtiedPages: dirty.length,
        heldPages: plan.held,
        elapsedMs: now() - tConnect,
        totalBytes: bytesSent,
        mbps: bandwidth,
        pageSize: region.pageSize,
      });
      const perPage = sentPages > 0 ? bytes / sentPages : region.pageSize;
      const dirtyMbps = (dirty.length * region.pageSize) / 1e3 / Math.max(duration, 0.001);
      const stats: RoundStats = {
        round,
        pages: sentPages,
        bytes,
        duration_ms: +duration.toFixed(3),
        mbps: +roundMbps.toFixed(1),
        bandwidth_mbps: +bandwidth.toFixed(1),
        carried_pages: unsent.length,
        dirty_pages: dirty.length,
        dirty_pages_rate: +((dirty.length * 1000) / Math.max(duration, 0.001)).toFixed(0),
        dirty_mbps: +dirtyMbps.toFixed(1),
        wws_pages: plan.held,
        transferred: bytesSent,
        remaining: Math.round((plan.send.length + plan.held) * perPage),
        expected_downtime_ms: +d.estimateMs.toFixed(3),
        cpu_throttle_percentage: policy.throttle,
        max_bandwidth_mib_s: bucket ? +(bucket.bytesPerSecond / 2 ** 20).toFixed(1) : 0,
        decision: d.action,
        reason: d.reason,
      };
      perRound.push(stats);
      progress({ type: 'round', ...stats });
      pending = plan.send;
      if (ra) {
        // Clark: the next round at this round's dirtying rate plus a margin
        roundLimitMiBps = (dirtyMbps * 1e6) / 2 ** 20 + ra.incrementMiBps;
        applyCap();
      }
      if (d.action === 'throttle') {
        throttled = true;
        await options.throttle!(d.level);
        maxThrottle = Math.max(maxThrottle, d.level);
      } else if (d.action === 'postcopy' || mode === 'hybrid' || options.control?.postcopyRequested) {
        if (!link) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `${d.reason}: the destination does not offer post-copy; the guest stays here`, { phase: 'precopy' });
        stopReason = d.action === 'postcopy' ? `${d.reason}: switching to post-copy` : mode === 'hybrid' ? 'hybrid: switching to post-copy after the first pass' : 'post-copy requested';
        switchToPostcopy = true;
        break;
      } else if (d.action === 'abort') {
        throw new LivemigError(d.code, d.reason, { phase: 'precopy' });
      } else if (d.action === 'stop') {
        stopReason = d.reason;
        forcedStop = d.forced;
        break;
      }
      round++;
    }
    // stop-and-copy goes at the cap, not at the last round's adapted rate
    roundLimitMiBps = undefined;
    applyCap();
    const held = wws ? wws.heldPages() : new Uint32Array(0);
    if (held.length > 0) pending = mergePages(pending, held);

    // Let the destination finish applying what is in flight before the pause, so that the
    // pause does not pay for its backlog.
    for (; mode !== 'postcopy'; ) {
      const ack = decodeRoundAck((await channel.expect(FrameType.RoundAck, (f) => peerError(f, 'precopy'))).payload);
      if (ack.round >= round) break;
    }
    if (switchToPostcopy) {
      // the priority connection joins, and the page server's tables are made, before the pause
      const prio = await attachConnection(link!, 'prio');
      const allPages = new Uint8Array(region.pageCount).fill(1);
      const server = new PageServer(region, allPages, version, round + 1, batchPages);
      state = 'stop-and-copy';
      const tPause = now();
      trace('source: pause requested (post-copy)');
      const deviceState = await pauseGuest().catch((e: unknown) => {
        prio.close();
        throw e;
      });
      let needed = allPages;
      let pagesNeeded = region.pageCount;
      if (mode !== 'postcopy') {
        // the last collect: the guest stays paused until it runs elsewhere or resumes after a failure
    // (when the migration is over and tracking stops), so nothing needs protecting again
    const final = tracker instanceof UffdAsyncTracker ? tracker.collectSync({ rearm: false }) : await tracker.collect();
        const stale = mergePages(pending, final);
        needed = new Uint8Array(region.pageCount);
        for (const p of stale) needed[p] = 1;
        pagesNeeded = stale.length;
        server.setNeeded(needed);
      }
      trace('source: guest paused (post-copy)');
      let downtime = 0;
      const tPc = now();
      const pc = await runPostcopy({
        server,
        channel,
        deviceState: encodeDeviceState(deviceState, version),
        prio,
        link: link!,
        region,
        needed,
        pagesNeeded,
        hashes,
        recoverTimeoutMs: options.recoverTimeoutMs ?? 60_000,
        peerError,
        onCommitted: () => (state = 'activating'),
        onRunning: () => {
          state = 'postcopy';
          downtime = now() - tPause;
          trace('source: POSTCOPY_RUNNING received');
          progress({ type: 'activated', downtime_ms: downtime });
          // tracking is over (the source is paused for good); stopping it is not the guest's pause
          if (mode !== 'postcopy') void tracker!.stop().catch(() => undefined);
        },
        onProgress: (st) => progress({ type: 'postcopy', ...st }),
        // the background push keeps to the bandwidth cap (requests for faulting pages do not wait)
        pace: async (bytes) => {
          const wait = bucket?.take(bytes, now()) ?? 0;
          if (wait > 0) await sleep(wait);
        },
        callPages: () => (bucket ? Math.max(16, Math.floor((bucket.bytesPerSecond * 0.02) / region.pageSize)) : 1024),
      });
      state = 'done';
      unsubscribe?.();
      await encoder?.close();
      if (options.release) await options.release();
      const es = encoder?.stats;
      return {
        verified: true,
        mode: mode === 'precopy' ? 'hybrid' : mode,
        digest: pc.digest.toString(16).padStart(16, '0'),
        prep_ms: +prepMs.toFixed(1),
        // until the destination held every page (the guest no longer depends on this side)
        total_ms: +(pc.complete_at - tFirstPage).toFixed(1),
        downtime_ms: +downtime.toFixed(3),
        rounds: mode === 'postcopy' ? 0 : round,
        region_bytes: region.size,
        wire_bytes: bytesSent + pc.stats.bytes,
        pages_sent: pagesSent + pc.stats.pages_pushed + pc.stats.pages_served,
        tracker: tracker.backend,
        zero_pages: es?.zero_pages ?? 0,
        dup_pages: es?.dup_pages ?? 0,
        lz4_pages: es?.lz4_pages ?? 0,
        raw_pages: (es ? es.raw_pages : pagesSent) + pc.stats.pages_pushed + pc.stats.pages_served,
        skipped_pages: es?.skipped_pages ?? 0,
        lz4_ratio: es && es.lz4_in > 0 ? +(es.lz4_out / es.lz4_in).toFixed(3) : 1,
        encodings: encoder !== undefined,
        per_round: perRound,
        stop_reason: stopReason || 'post-copy from the start',
        forced_stop: false,
        max_throttle_percentage: maxThrottle,
        stop_and_copy: { pages: 0, bytes: 0, pause_ms: 0, final_collect_ms: 0, send_ms: 0, commit_ms: 0, activate_ms: +pc.activate_ms.toFixed(3) },
        postcopy: { ...pc.stats, pages_needed: pagesNeeded, postcopy_ms: +(pc.complete_at - tPc).toFixed(1), verify_ms: +pc.verify_ms.toFixed(1) },
      };
    }

    // Stop-and-copy: the guest pauses; the last dirty pages and the device state go.
    state = 'stop-and-copy';
    const tPause = now();
    trace('source: pause requested');
    const deviceState = await pauseGuest();
    const tPaused = now();
    trace('source: guest paused');
    // the last collect: the guest stays paused until it runs elsewhere or resumes after a failure
    // (when the migration is over and tracking stops), so nothing needs protecting again
    const final = tracker instanceof UffdAsyncTracker ? tracker.collectSync({ rearm: false }) : await tracker.collect();
    const tCollected = now();
    trace('source: final collect done');
    const lastPages = mergePages(pending, final);
    const lastBytes = (await sendRound(round + 1, lastPages, true)).bytes;
    trace('source: last pages sent');
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
      await channel.send(encodeDeviceState(deviceState, version));
      digest = addon.digestTable(hashes);
      trace('source: digest computed');
      await channel.send(encodeCommit({ digest, pageCount: region.pageCount, activate: true }, version));
      state = 'activating';
      tSent = now();
      trace(`source: last ${lastPages.length} pages, device state and COMMIT sent`);
      activated = decodeActivated((await channel.expect(FrameType.Activated, (f) => peerError(f, 'activate'))).payload);
      tCommitted = now();
      progress({ type: 'committed', digest: digest.toString(16) });
      progress({ type: 'stop-and-copy', pages: lastPages.length, bytes: lastBytes });
    } else {
      digest = addon.digestTable(hashes);
      await channel.send(encodeDeviceState(deviceState, version));
      tSent = now();
      state = 'commit';
      await channel.send(encodeCommit({ digest, pageCount: region.pageCount }, version));
      const ack = decodeCommitAck((await channel.expect(FrameType.CommitAck, (f) => peerError(f, 'commit'))).payload);
      if (ack.digest !== digest) throw new LivemigError('ERR_LIVEMIG_DIGEST', `destination acknowledged digest ${ack.digest.toString(16)}, ours is ${digest.toString(16)}`, { phase: 'commit' });
      tCommitted = now();
      progress({ type: 'committed', digest: digest.toString(16) });
      progress({ type: 'stop-and-copy', pages: lastPages.length, bytes: lastBytes });
      // Point of commitment: once ACTIVATE is on its way, the source must never resume by itself.
      state = 'activating';
      await channel.send(encodeActivate(version));
      activated = decodeActivated((await channel.expect(FrameType.Activated, (f) => peerError(f, 'activate'))).payload);
    }
    const tActive = now();
    trace('source: ACTIVATED received');
    state = 'done';
    // tracking stops after the hand-over: the guest is paused, and undoing write protection
    // walks the whole range (kernel work that has no place in the pause)
    await tracker.stop();
    const downtime = tActive - tPause;
    progress({ type: 'activated', downtime_ms: downtime });
    unsubscribe?.();
    await channel.finish();
    await encoder?.close();
    if (options.release) await options.release();
    const es = encoder?.stats;
    return {
      verified: true,
      mode: 'precopy',
      digest: digest.toString(16).padStart(16, '0'),
      prep_ms: +prepMs.toFixed(1),
      total_ms: +(tActive - tFirstPage).toFixed(1),
      downtime_ms: +downtime.toFixed(3),
      rounds: round,
      region_bytes: region.size,
      wire_bytes: bytesSent,
      pages_sent: pagesSent,
      tracker: tracker.backend,
      zero_pages: es?.zero_pages ?? 0,
      dup_pages: es?.dup_pages ?? 0,
      lz4_pages: es?.lz4_pages ?? 0,
      raw_pages: es ? es.raw_pages : pagesSent,
      skipped_pages: es?.skipped_pages ?? 0,
      lz4_ratio: es && es.lz4_in > 0 ? +(es.lz4_out / es.lz4_in).toFixed(3) : 1,
      encodings: encoder !== undefined,
      per_round: perRound,
      stop_reason: stopReason,
      forced_stop: forcedStop,
      max_throttle_percentage: maxThrottle,
      stop_and_copy: {
        pages: lastPages.length,
        bytes: lastBytes,
        pause_ms: +(tPaused - tPause).toFixed(3),
        final_collect_ms: +(tCollected - tPaused).toFixed(3),
        send_ms: +(tSent - tCollected).toFixed(3),
        commit_ms: +(tCommitted - tSent).toFixed(3),
        activate_ms: +activated.activateMs.toFixed(3),
      },
    };
  } catch (e) {
    const failedIn = state;
    state = 'failed';
    // A destination that refused something sends ERROR and closes; our send may fail first.
    // Its ERROR, if it arrives within a moment, is the real cause.
    if (channel && e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CONNECTION') {
      await new Promise((r) => setTimeout(r, 50));
      const f = channel.takeQueuedError();
      if (f) e = peerError(f, failedIn);
    }
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_ABORTED', `migration failed in ${failedIn}: ${(e as Error).message}`, { phase: failedIn, cause: e });
    // The destination answering ACTIVATE with an ERROR has discarded its copy (its activation
    // failed): the source is still the only guest, so it resumes below like any early failure.
    if ((failedIn as SenderState) === 'postcopy') {
      // the guest runs at the destination: it must never resume here; this copy stays, paused
      channel?.close();
      throw err;
    }
    if (failedIn === 'activating' && !reportedByPeer.has(err)) {
      channel?.close();
      throw new LivemigError('ERR_LIVEMIG_ACTIVATION_UNKNOWN', `ACTIVATE was sent but not confirmed (${err.message}); the source guest stays paused and is not released: check the destination before resuming it`, {
        phase: 'activate',
        cause: err,
      });
    }
    // Before commitment: tell the destination to discard, stop tracking, resume the guest here.
    if (channel) await channel.finish(channel.closed ? undefined : encodeAbort({ reason: err.message }, PROTOCOL_VERSION));
    unsubscribe?.();
    await tracker?.stop().catch(() => undefined); // a stop failure must not hide the cause
    await encoder?.close().catch(() => undefined);
    if (throttled) {
      try {
        await options.throttle!(0); // the guest runs at full speed here again
      } catch (te) {
        throw new LivemigError('ERR_LIVEMIG_GUEST', `migration failed (${err.message}) and releasing the guest's throttle failed: ${(te as Error).message}`, { phase: failedIn, cause: te });
      }
    }
    if (paused) {
      try {
        await options.resume();
      } catch (re) {
        throw new LivemigError('ERR_LIVEMIG_GUEST', `migration failed (${err.message}) and resuming the guest on the source failed too: ${(re as Error).message}`, { phase: failedIn, cause: re });
      }
    }
    throw err;
  }
}
