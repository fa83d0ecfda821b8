/**
 * What the source's stages share: the settings, the connection, the tracker, the encoder, the
 * pacer, the counters and the one place where the migration's stage changes. Each stage is a
 * function over this object (see migrate.ts for the order).
 */
import type { ReadPath } from '../region/read-path.js';
import { LivemigError } from '../errors.js';
import type { PageEncoder, RoundPages } from '../encoding/encoder.js';
import type { ChannelChoice, OutgoingChannels } from './channels.js';
import { Pacer } from '../pacing/pacer.js';
import { Stages } from '../stages.js';
import { Deadlines } from './deadlines.js';
import { LiveStatus } from './live-status.js';
import type { PostcopyLink } from '../postcopy/switch.js';
import { encodeAbort, type Accept } from '../protocol/messages.js';
import type { FramedConnection } from '../protocol/connection.js';
import type { SecurityReport } from '../security/tls.js';
import type { DirtyTracker } from '../tracking/types.js';
import type { Settings } from './options.js';
import type { ProgressEvent, RoundStats } from './types.js';

export type SourceStage = 'connecting' | 'handshake' | 'precopy' | 'stop-and-copy' | 'commit' | 'activating' | 'postcopy' | 'done' | 'failed';

/**
 * The stages each stage may lead to. Commitment is entering `activating`: from then on the
 * guest must never resume here by itself.
 */
const NEXT = {
  connecting: ['handshake', 'failed'],
  handshake: ['precopy', 'failed'],
  precopy: ['stop-and-copy', 'failed'],
  'stop-and-copy': ['commit', 'activating', 'failed'],
  commit: ['activating', 'failed'],
  activating: ['postcopy', 'done', 'failed'],
  postcopy: ['done', 'failed'],
  done: [],
  failed: [],
} as const satisfies { readonly [S in SourceStage]: readonly SourceStage[] };

export const now = (): number => performance.now();

/**
 * How long a cancelled migration's destination has to read up to the ABORT that says so (the
 * pages already in flight before it) and close: past it the connections are shut down anyway.
 */
export const CANCEL_TOLD_MS = 5_000;

/** What the handshake established; fixed for the rest of the migration. */
export interface Session {
  conn: FramedConnection;
  version: number;
  accept: Accept;
  tracker: DirtyTracker;
  trackerReason: string;
  /** how pre-copy reads the guest's pages (region/read-path.ts) */
  readPath: ReadPath;
  /** post-copy's way to open more connections, when the destination offers post-copy */
  link: PostcopyLink | undefined;
  encoder: PageEncoder | undefined;
  /** the connections pre-copy's pages go on, the main one first (channels.ts) */
  channels: OutgoingChannels;
  channelChoice: ChannelChoice;
  /** when the handshake and reservation were done (ms), and how long they took */
  prepMs: number;
  security: SecurityReport;
}

export class SourceContext {
  readonly settings: Settings;
  readonly pacer: Pacer;
  readonly tConnect = now();
  /** per-page hashes of what was sent: the commitment digest is over them */
  readonly hashes: BigUint64Array;
  readonly perRound: RoundStats[] = [];
  readonly #stages = new Stages<SourceStage>('connecting', 'failed', NEXT);
  readonly deadlines: Deadlines;
  #session: Session | undefined;
  #unbindControl: (() => void) | undefined;
  #unbindCancel: (() => void) | undefined;
  #unbindStatus: (() => void) | undefined;
  /** pagesSent when `pending` was last set: what of it is still due is pending minus what went since */
  pendingSince = 0;
  /** the frame that lets the destination activate is on its way: nothing may abort any more */
  #committing = false;
  /** why the migration was ended from outside (a cancel, a deadline); the rollback reports it */
  abortReason: LivemigError | undefined;
  /** a cancel was said to the destination (#tellCancel): the rollback lets it arrive before closing */
  cancelTold = false;
  /** called once by abort() while the connection is still being opened */
  #onAbort: (() => void) | undefined;
  /** the connection, as soon as it exists (the handshake may fail before the session does) */
  conn: FramedConnection | undefined;
  tracker: DirtyTracker | undefined;
  encoder: PageEncoder | undefined;
  /** every channel, as soon as they exist (a rollback closes the extra ones) */
  channels: OutgoingChannels | undefined;
  /** when the guest stopped running, where the VMM said so (its downtime begins there; else at the pause asked) */
  tStopped: number | undefined;

  /** When the guest paused at `tPause` stopped running: then, or later where its VMM said so. */
  stoppedAt(tPause: number): number {
    return Math.max(tPause, this.tStopped ?? tPause);
  }
  /** the guest was paused (or a pause failed half-way): a rollback must resume it */
  paused = false;
  /** the guest was throttled: a rollback must release the throttle */
  throttled = false;
  maxThrottle = 0;
  bytesSent = 0;
  pagesSent = 0;
  /** pages sent of each region of the layout */
  readonly regionPages: number[];
  /** with disks: where each disk's blocks start in the page space (after the memory), and the end */
  readonly #diskStarts: number[];
  /** with disks: blocks sent of each disk */
  readonly diskBlocks: number[];
  /** with disks: the blocks the pause sent (COMMIT tells the destination, which syncs only if any) */
  finalDiskBlocks = 0;
  tFirstPage = 0;
  /** the current (at the end, the last) pre-copy round; post-copy's pages carry the next one */
  round = 1;
  /** pages still due, ascending */
  pending: Uint32Array;
  /** what the destination said it holds from the start (IMAGE_HASHES: a kept image), if it did */
  destinationHashes: BigUint64Array | undefined;
  /** pages the guest's memory held no data for when the first pass (or post-copy) began: never read nor sent (holes.ts) */
  holePages = 0;
  stopReason = '';
  forcedStop = false;
  /** what MigrationControl.status() answers (progress between events) */
  readonly live: LiveStatus;

  constructor(settings: Settings) {
    this.settings = settings;
    const { options } = settings;
    // a same-host upgrade sends no page: its digest is over nothing (both sides agree on that,
    // and neither reads a table of a gigabyte's pages inside the pause)
    this.hashes = new BigUint64Array(options.local ? 0 : options.region.pageCount);
    this.regionPages = settings.layout.regions.map(() => 0);
    const disks = options.disks ?? [];
    this.#diskStarts = [settings.layout.pageCount];
    for (const d of disks) this.#diskStarts.push(this.#diskStarts.at(-1)! + d.size / options.region.pageSize);
    this.diskBlocks = disks.map(() => 0);
    // a same-host upgrade's destination maps the very memory: nothing is pending
    this.pending = options.local ? new Uint32Array(0) : Uint32Array.from({ length: options.region.pageCount }, (_, i) => i);
    this.pacer = new Pacer({
      pageSize: options.region.pageSize,
      batchPages: settings.batchPages,
      ...((options.control?.bandwidth ?? options.bandwidthMiBps) !== undefined ? { capMiBps: options.control?.bandwidth ?? options.bandwidthMiBps } : {}),
      ...(options.rateAdaptation ? { startMiBps: options.rateAdaptation.startMiBps } : {}),
    });
    this.#unbindControl = options.control?.bind(this.pacer);
    this.#unbindCancel = options.control?.bindCancel(() => {
      if (
        !this.abort(
          new LivemigError('ERR_LIVEMIG_CANCELLED', `migration cancelled in ${this.stage}; the guest keeps running on the source`, { phase: this.stage }),
        )
      ) {
        throw new LivemigError(
          'ERR_LIVEMIG_STATE',
          `cannot cancel in ${this.stage}: the migration has passed its point of commitment (the guest may already run at the destination)`,
          { phase: 'cancel' },
        );
      }
    });
    this.live = new LiveStatus({
      stage: () => this.stage,
      round: () => this.round,
      pageSize: options.region.pageSize,
      pageCount: options.region.pageCount,
      sent: () => ({ bytes: this.bytesSent, pages: this.pagesSent }),
      inFlight: () => this.channels?.inFlight() ?? { bytes: 0, pages: 0 },
      pending: () => ({ listed: this.pending.length, sentSince: this.pagesSent - this.pendingSince }),
      pacer: this.pacer,
      peekWritten: () => this.tracker?.peekWritten?.() ?? Promise.resolve(undefined),
      ...(options.disks?.length ? { disks: () => options.disks!.map((d, i) => ({ name: d.name, bytes: d.size, blocks_sent: this.diskBlocks[i] ?? 0 })) } : {}),
    });
    this.#unbindStatus = options.control?.bindStatus(() => this.live.status());
    this.deadlines = new Deadlines({
      progressTimeoutMs: settings.progressTimeoutMs,
      maxPauseMs: settings.maxPauseMs,
      abort: (e) => void this.abort(e),
      stage: () => this.stage,
    });
  }

  /**
   * Ends the migration before its point of commitment: every pending and later operation on
   * the connection fails with `reason`, and the rollback resumes the guest here. False (and
   * nothing done) once commitment has begun or the migration is over.
   */
  abort(reason: LivemigError): boolean {
    const s = this.stage;
    if (this.#committing || s === 'activating' || s === 'postcopy' || s === 'done' || s === 'failed') return false;
    this.abortReason ??= reason;
    this.deadlines.stop();
    if (reason.code === 'ERR_LIVEMIG_CANCELLED' && this.#session) this.#tellCancel(reason, this.#session);
    else this.conn?.abort(reason);
    this.#onAbort?.();
    return true;
  }

  /**
   * A cancel is said to the destination, on every connection (whichever it reads first tells
   * it): an ABORT {cancelled} after the frame each is sending, so that it records a cancel and
   * not a lost connection. Only once the handshake is done: before, the destination reads no
   * frame it does not expect (a frame after HELLO, before ACCEPT, is refused), and the cut
   * connection is what it hears. A deadline is not said: its peer is the one that stopped
   * answering.
   */
  #tellCancel(reason: LivemigError, session: Session): void {
    const abort = encodeAbort({ reason: reason.message, cancelled: true }, session.version);
    for (const c of session.channels.all) c.conn.abortTelling(reason, abort, CANCEL_TOLD_MS);
    this.cancelTold = true;
  }

  /** While the connection is being opened, what abort() must undo (destroy the socket). */
  onAbort(fn: (() => void) | undefined): void {
    this.#onAbort = fn;
    if (fn && this.abortReason) fn();
  }

  #fence: Promise<void> | undefined;

  /**
   * The guest is told the migration may commit (HANDOVER.md, the lease): from here on it must
   * not resume by itself. Called as early as the commitment is in sight (the device state is
   * out), so that its round trip runs beside the destination's; beginCommitment awaits it.
   */
  announceCommitment(): void {
    if (this.#fence || !this.settings.options.commit) return;
    // called now, not on a later turn: the request must leave before the work it runs beside
    try {
      this.#fence = Promise.resolve(this.settings.options.commit());
    } catch (e) {
      this.#fence = Promise.reject(e);
    }
    this.#fence.catch(() => undefined); // awaited in beginCommitment
  }

  /** Right before the frame that lets the destination activate: no abort from here on. */
  async beginCommitment(): Promise<void> {
    if (this.abortReason) throw this.abortReason;
    this.announceCommitment();
    if (this.#fence) {
      try {
        await this.#fence;
      } catch (e) {
        throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest did not take the commitment: ${(e as Error).message}`, { phase: this.stage, cause: e });
      }
    }
    if (this.abortReason) throw this.abortReason;
    this.#committing = true;
    this.deadlines.stop();
  }

  get stage(): SourceStage {
    return this.#stages.current;
  }

  /** The one place the stage changes; a transition the table does not allow is a bug here. */
  enter(next: SourceStage): void {
    this.#stages.enter(next);
  }

  /** Records a failure; returns the stage it happened in. */
  fail(): SourceStage {
    return this.#stages.fail();
  }

  get session(): Session {
    if (!this.#session) throw new LivemigError('ERR_LIVEMIG_STATE', 'internal: the handshake has not completed', { phase: this.#stages.current });
    return this.#session;
  }

  set session(s: Session) {
    this.#session = s;
  }

  get deadlineAt(): number | undefined {
    return this.settings.options.deadlineMs !== undefined ? this.tConnect + this.settings.options.deadlineMs : undefined;
  }

  progress(e: ProgressEvent): void {
    this.settings.options.onProgress?.(e);
  }

  /** Sends pages of a round, each on its channel, through the encoders or plain when encodings are off; counts them. */
  async sendPages(o: RoundPages): Promise<number> {
    const { pages } = o;
    const n = await this.session.channels.send(o);
    this.bytesSent += n;
    this.pagesSent += pages.length;
    this.settings.layout.breakdown(pages, this.regionPages);
    if (this.diskBlocks.length) countBetween(pages, this.#diskStarts, this.diskBlocks);
    this.deadlines.noteProgress();
    return n;
  }

  /** Pauses the guest for the switch; returns its device state. `onHalted`: it writes no more memory (PauseLease). */
  async pauseGuest(onHalted?: () => void): Promise<Uint8Array> {
    this.tStopped = undefined;
    const onStopped = (at: number): void => void (this.tStopped = at);
    const halted = onHalted
      ? (): void => {
          this.paused = true; // from here a failure must resume it, even while its save goes on
          onHalted();
        }
      : undefined;
    try {
      const deviceState = await this.settings.options.pause({ maxPauseMs: this.settings.maxPauseMs, onStopped, ...(halted ? { onHalted: halted } : {}) });
      this.paused = true;
      return deviceState;
    } catch (e) {
      this.paused = true; // a pause that failed half-way must still be undone
      throw new LivemigError('ERR_LIVEMIG_GUEST', `pausing the guest failed: ${(e as Error).message}`, { phase: 'stop-and-copy', cause: e });
    }
  }

  /** Live controls no longer reach this migration. */
  unbindControl(): void {
    this.#unbindControl?.();
    this.#unbindCancel?.();
    this.#unbindStatus?.();
    this.#unbindControl = this.#unbindCancel = this.#unbindStatus = undefined;
    this.deadlines.stop();
  }
}

/** Adds to into[i] how many of the ascending `pages` lie in [bounds[i], bounds[i + 1]). */
function countBetween(pages: Uint32Array, bounds: readonly number[], into: number[]): void {
  const firstAtOrAfter = (x: number): number => {
    let lo = 0;
    let hi = pages.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (pages[mid]! < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  for (let i = 0; i + 1 < bounds.length; i++) into[i]! += firstAtOrAfter(bounds[i + 1]!) - firstAtOrAfter(bounds[i]!);
}
