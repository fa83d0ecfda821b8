/**
 * The catalogue of trace events (src/trace.ts), one constant object per family, each with the
 * payload its event carries. Tests and the fault matrix name an event through these constants,
 * never by its text: a renamed event is then a compile error there, not a fault cell that
 * silently never fires. The names stay readable prose because trace files and the docs show them.
 *
 * A subscriber gets `{ ms, event, ...payload }` (`TraceMessage<F>`); an event whose payload is
 * `undefined` carries only `ms` and `event`.
 *
 * This file imports no module that traces (the catalogue is a leaf: no import cycles), so the
 * payloads spell their fields rather than borrowing the emitters' types.
 */
import type { EncodingStats } from './encoding/stats.js';
import type { ErrorCode } from './errors.js';
import type { Refusal } from './refusals.js';

/** livemig:source, the source's steps. */
export const SourceEvent = {
  connected: 'connected',
  helloSent: 'HELLO sent',
  roundBegins: 'round begins',
  holesSkipped: 'holes skipped',
  channelsEnd: 'channels end',
  channelsEnded: 'channels ended',
  pauseRequested: 'pause requested',
  guestPaused: 'guest paused',
  finalCollectDone: 'final collect done',
  lastPagesSent: 'last pages sent',
  digestComputed: 'digest computed',
  destinationDigestReceived: 'destination digest received',
  commitSent: 'last pages, device state and COMMIT sent',
  activatedReceived: 'ACTIVATED received',
  commitmentUnconfirmed: 'commitment unconfirmed: resolving',
  commitmentResolved: 'commitment resolved',
  pauseRequestedPostcopy: 'pause requested (post-copy)',
  guestPausedPostcopy: 'guest paused (post-copy)',
  postcopySent: 'device state and POSTCOPY sent',
  postcopyRunningReceived: 'POSTCOPY_RUNNING received',
  postcopyLinkBroke: 'post-copy link broke',
  postcopyReconnectFailed: 'post-copy reconnection failed',
  dirtyCountFailed: 'dirty count failed',
  qemuStopped: 'QEMU stopped the VM',
  qemuQuitAtNormalPriority: 'QEMU quits at normal priority',
} as const;
export type SourceEvent = (typeof SourceEvent)[keyof typeof SourceEvent];

export interface SourcePayloads {
  [SourceEvent.connected]: undefined;
  [SourceEvent.helloSent]: undefined;
  [SourceEvent.roundBegins]: { round: number };
  /** pages the guest's memory holds no data for: counted as zero, never read nor sent */
  [SourceEvent.holesSkipped]: { pages: number };
  /** the parallel channels are asked to end (`why`: the end of pre-copy, or a failure) */
  [SourceEvent.channelsEnd]: { round: number; why: string };
  [SourceEvent.channelsEnded]: { round: number };
  [SourceEvent.pauseRequested]: undefined;
  [SourceEvent.guestPaused]: undefined;
  [SourceEvent.finalCollectDone]: undefined;
  [SourceEvent.lastPagesSent]: undefined;
  [SourceEvent.digestComputed]: undefined;
  [SourceEvent.destinationDigestReceived]: undefined;
  /** the point of commitment: `pages` went inside the pause */
  [SourceEvent.commitSent]: { pages: number };
  [SourceEvent.activatedReceived]: undefined;
  [SourceEvent.commitmentUnconfirmed]: { reason: string };
  [SourceEvent.commitmentResolved]: { outcome: 'activated' | 'not-activated'; attempts: number };
  [SourceEvent.pauseRequestedPostcopy]: undefined;
  [SourceEvent.guestPausedPostcopy]: undefined;
  [SourceEvent.postcopySent]: undefined;
  [SourceEvent.postcopyRunningReceived]: undefined;
  [SourceEvent.postcopyLinkBroke]: { reason: string };
  [SourceEvent.postcopyReconnectFailed]: { reason: string };
  /** counting the round's written pages for progress failed: the dirty rate falls back to the last round's */
  [SourceEvent.dirtyCountFailed]: { code: string; reason: string };
  /** QEMU's STOP event: the VM's vCPUs halted (inside its migrate, which then saves the device state) */
  [SourceEvent.qemuStopped]: undefined;
  /** QEMU could not be moved to idle priority before its quit (another user's process): it quits as it runs */
  [SourceEvent.qemuQuitAtNormalPriority]: { reason: string };
}

/** livemig:receiver, the destination's steps (the incoming guest's included). */
export const ReceiverEvent = {
  connectionAccepted: 'connection accepted',
  connectionRefused: 'connection refused',
  pendingEvicted: 'pending connection evicted',
  reserving: 'reserving',
  regionAllocated: 'region allocated',
  roundPagesApplied: 'round pages applied',
  channelsEnded: 'channels ended',
  deviceStateReceived: 'DEVICE_STATE received',
  guestPreparing: 'guest preparing, digest computed',
  guestLoadedState: 'guest loaded its state',
  commitReceived: 'COMMIT received',
  activating: 'activating',
  goSent: 'go sent',
  guestActivated: 'guest activated',
  activatedSent: 'ACTIVATED sent',
  sessionResolved: 'session resolved',
  postcopyReceived: 'POSTCOPY received',
  registered: 'registered',
  faultServiceStarted: 'fault service started',
  guestActivatedPostcopy: 'guest activated (post-copy)',
  postcopyRunningNotSent: 'POSTCOPY_RUNNING not sent',
  diskAsksRefused: 'the guest took no socket to ask for disk blocks on',
  postcopyLinkBroke: 'post-copy link broke',
  diskImagesNotKept: 'disk images not kept',
} as const;
export type ReceiverEvent = (typeof ReceiverEvent)[keyof typeof ReceiverEvent];

export interface ReceiverPayloads {
  [ReceiverEvent.connectionAccepted]: { from: string };
  /** a source refused: where from, why (one of REFUSAL_REASONS), the code and our words (src/refusals.ts) */
  [ReceiverEvent.connectionRefused]: Refusal;
  [ReceiverEvent.pendingEvicted]: { from: string; rank: 'opening' | 'answered' | 'proven'; pending: number };
  [ReceiverEvent.reserving]: { bytes: number };
  [ReceiverEvent.regionAllocated]: undefined;
  /** the first page frame of `round` was applied (main connection only) */
  [ReceiverEvent.roundPagesApplied]: { round: number };
  [ReceiverEvent.channelsEnded]: undefined;
  [ReceiverEvent.deviceStateReceived]: undefined;
  [ReceiverEvent.guestPreparing]: undefined;
  [ReceiverEvent.guestLoadedState]: undefined;
  [ReceiverEvent.commitReceived]: undefined;
  [ReceiverEvent.activating]: undefined;
  [ReceiverEvent.goSent]: undefined;
  [ReceiverEvent.guestActivated]: undefined;
  [ReceiverEvent.activatedSent]: undefined;
  [ReceiverEvent.sessionResolved]: { outcome: 'activated' | 'fenced' };
  [ReceiverEvent.postcopyReceived]: undefined;
  [ReceiverEvent.registered]: undefined;
  [ReceiverEvent.faultServiceStarted]: undefined;
  [ReceiverEvent.guestActivatedPostcopy]: undefined;
  [ReceiverEvent.postcopyRunningNotSent]: { reason: string };
  [ReceiverEvent.diskAsksRefused]: { reason: string };
  [ReceiverEvent.postcopyLinkBroke]: { reason: string };
  [ReceiverEvent.diskImagesNotKept]: { reason: string };
}

/** livemig:guest, the reference guest's steps (published in the guest's own process). */
export const GuestEvent = {
  incomingMapped: 'incoming: mapped',
  incomingRunning: 'incoming: running',
  firstBeat: 'first beat',
  lateTick: 'late tick',
  registeredAgain: 'registered again',
} as const;
export type GuestEvent = (typeof GuestEvent)[keyof typeof GuestEvent];

export interface GuestPayloads {
  [GuestEvent.incomingMapped]: undefined;
  [GuestEvent.incomingRunning]: undefined;
  [GuestEvent.firstBeat]: { seq: number };
  [GuestEvent.lateTick]: { ms_since_last: number };
  [GuestEvent.registeredAgain]: { name: string };
}

/** livemig:chooser, the page encoder's accounting. */
export const ChooserEvent = {
  roundSent: 'round sent',
} as const;
export type ChooserEvent = (typeof ChooserEvent)[keyof typeof ChooserEvent];

export interface ChooserPayloads {
  /** times are the encoder's totals so far, ms */
  [ChooserEvent.roundSent]: EncodingStats & {
    round: number;
    wall_ms: number;
    in_place_pages: number;
    in_place_ms: number;
    overhead_ms: number;
    index_ms: number;
    /** the chooser's state in words */
    chooser: string;
  };
}

/** livemig:daemon, the daemon's guests, migrations and API. */
export const DaemonEvent = {
  serving: 'serving',
  fewerMigrations: 'fewer migrations at once than asked: UV_THREADPOOL_SIZE is too small',
  guestConnectionRefused: 'guest connection refused',
  guestRefused: 'guest refused',
  guestRegistered: 'guest registered',
  guestLeft: 'guest left',
  migrationFailed: 'migration failed',
  guestNotLetGo: 'a guest a migration took was not let go cleanly',
  incomingFailed: 'incoming migration failed',
  shuttingDown: 'shutting down',
  shutdownWaits: 'shutdown waits for a committed migration',
  shutdownAborted: 'shutdown aborted incoming migrations',
  apiCloseFailed: 'closing the API failed',
  historyFailed: 'the migration history failed',
  imageKept: 'image kept',
  imageNotKept: 'image not kept',
} as const;
export type DaemonEvent = (typeof DaemonEvent)[keyof typeof DaemonEvent];

export interface DaemonPayloads {
  [DaemonEvent.serving]: { api: string; port: number; guests: string };
  [DaemonEvent.fewerMigrations]: { asked: number; allowed: number };
  [DaemonEvent.guestConnectionRefused]: { reason: string };
  /** `code` when its hello failed, `name` when the name is taken */
  [DaemonEvent.guestRefused]: { code?: ErrorCode; name?: string; reason: string };
  [DaemonEvent.guestRegistered]: { name: string; pid: number; bytes: number };
  [DaemonEvent.guestLeft]: { name: string };
  [DaemonEvent.migrationFailed]: { id: string; code: ErrorCode; reason: string };
  /** a QEMU VM after a failed migration: resuming it, or giving its migration settings back, failed */
  [DaemonEvent.guestNotLetGo]: { id: string; reason: string };
  /** a released guest's memory, kept for its return (images.ts) */
  [DaemonEvent.imageKept]: { guest: string; bytes: number; held_bytes: number };
  [DaemonEvent.imageNotKept]: { guest: string; reason: string };
  [DaemonEvent.incomingFailed]: { reason: string };
  [DaemonEvent.shuttingDown]: { running: number };
  [DaemonEvent.shutdownWaits]: { id: string; reason: string };
  [DaemonEvent.shutdownAborted]: { aborted: number };
  [DaemonEvent.apiCloseFailed]: { reason: string };
  [DaemonEvent.historyFailed]: { code: ErrorCode; reason: string };
}

/** Each family's events, as the trace file and the diagnostics channels name them. */
export const TRACE_EVENTS = {
  source: SourceEvent,
  receiver: ReceiverEvent,
  guest: GuestEvent,
  chooser: ChooserEvent,
  daemon: DaemonEvent,
} as const;

export interface TracePayloads {
  source: SourcePayloads;
  receiver: ReceiverPayloads;
  guest: GuestPayloads;
  chooser: ChooserPayloads;
  daemon: DaemonPayloads;
}

export type TraceFamily = keyof TracePayloads;
export type TraceEvent<F extends TraceFamily> = keyof TracePayloads[F] & string;
export type TracePayload<F extends TraceFamily, E extends TraceEvent<F>> = TracePayloads[F][E];

/** What a subscriber to family F's diagnostics channel receives, narrowed by `event`. */
export type TraceMessage<F extends TraceFamily> = {
  [E in TraceEvent<F>]: { ms: number; event: E } & (TracePayloads[F][E] extends undefined ? unknown : TracePayloads[F][E]);
}[TraceEvent<F>];

// Each family's constants and its payload table name the same events: an event added to one
// and not the other fails to compile here.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Names<F extends TraceFamily> = (typeof TRACE_EVENTS)[F][keyof (typeof TRACE_EVENTS)[F]];
const covered: { [F in TraceFamily]: Same<Names<F>, TraceEvent<F>> } = { source: true, receiver: true, guest: true, chooser: true, daemon: true };
void covered;
