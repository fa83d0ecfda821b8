/**
 * What the destination's stages share: the connection, the options, the listener's tables, what
 * has been reserved and negotiated, and the one place where the migration's stage changes. Each
 * stage is a function over this object (see receiver.ts for the order).
 */
import type { PageExtents } from '../pages/extents.js';
import type { LivemigError } from '../errors.js';
import type { GuestLayout } from '../guest/layout.js';
import type { FaultService } from '../postcopy/dest.js';
import { PROTOCOL_VERSION } from '../protocol/format.js';
import type { FramedConnection } from '../protocol/connection.js';
import type { Region } from '../region/region.js';
import type { IncomingDisk } from '../disk/incoming.js';
import type { WatchedImages } from '../disk/watch.js';
import type { SecurityReport } from '../security/tls.js';
import { Stages } from '../stages.js';
import type { Admitted } from './admit.js';
import type { IncomingChannels } from './channels.js';
import type { OutcomeTable, SessionOutcome } from './outcomes.js';
import type { PostcopySession, SessionTable } from './session.js';
import type { ReceiveOptions, ReceiveProgress, ReceiveReport, ReceiverState } from './types.js';

/** How long a source may take to authenticate (the destination holds nothing for it meanwhile). */
export const AUTH_TIMEOUT_MS = 10_000;

const NEXT = {
  hello: ['reserve', 'failed'],
  reserve: ['receiving', 'failed'],
  receiving: ['committed', 'postcopy', 'failed'],
  committed: ['activated', 'failed'],
  activated: [],
  postcopy: [],
  failed: [],
} as const satisfies { readonly [S in ReceiverState]: readonly ReceiverState[] };

/** A migration to serve: its connection, what it may do here, and the listener's tables it joins. */
export interface MigrationToServe {
  /** the connection, authenticated, with its first frame (which must be HELLO) */
  admitted: Admitted;
  options: ReceiveOptions;
  /** where a listener routes the connections that join a session (post-copy, extra channels) */
  sessions: SessionTable;
  /** each session's outcome, for a source that lost the link and asks (RESOLVE) */
  outcomes: OutcomeTable;
  /** a listener's way to end its running migrations (abortUnpaused): this one's abort is in it while it runs */
  abortable?: Set<(reason: LivemigError) => boolean>;
}

/** What the handshake settled; fixed for the rest of the migration. */
export interface Accepted {
  /** the page space pages are received into: the guest's memory, then its disks */
  region: Region;
  /** with disks: the guest's memory alone, which prepare and activate get */
  memory?: Region;
  disks?: IncomingDisk[];
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
  /** only these pages, the source's hint, were allocated ahead (CAP_HOLES): a switch to post-copy allocates the rest it needs */
  resident: PageExtents | undefined;
}

/** What arrived so far. */
export class Received {
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

export class ReceiverContext {
  readonly conn: FramedConnection;
  readonly options: ReceiveOptions;
  readonly sessions: SessionTable;
  readonly outcomes: OutcomeTable;
  readonly security: SecurityReport;
  /** the address the source reached: on loopback, an old source may still migrate unauthenticated */
  readonly localAddress: string;
  /** where the source connected from, and its authenticated name when it has one */
  readonly peer: string;
  readonly #onProgress: (e: ReceiveProgress) => void;
  readonly #stages = new Stages<ReceiverState>('hello', 'failed', NEXT);
  /** the negotiated version (until HELLO is read, ours: an early ERROR is written in it) */
  version = PROTOCOL_VERSION;
  region: Region | undefined;
  /** with disks: the guest's memory (region is memory and disks) and the images, undone by a discard */
  memory: Region | undefined;
  disks: IncomingDisk[] | undefined;
  /** with disks: why they cannot follow the guest by post-copy here (undefined: they can) */
  diskPostcopyRefusal: string | undefined;
  /** with disks: the guest's name at the source (its kept images are noted under it), and which disks were kept images taken back */
  diskGuest: string | undefined;
  keptDisks: number[] | undefined;
  /** with disks, where post-copy may follow: the images' watch (closed when the guest runs by pre-copy, or the migration fails) */
  diskWatch: WatchedImages | undefined;
  /** with disks: the ROUND_ACKs waiting on their round's blocks to be durable, in order */
  diskAcks: Promise<void> | undefined;
  /** the guest's regions in the page space (HELLO's table, or one region) */
  layout: GuestLayout | undefined;
  /** the session further connections join (post-copy, extra channels), when there is one */
  session: PostcopySession | undefined;
  /** the extra channels pre-copy's pages come on, when more than one was granted */
  channels: IncomingChannels | undefined;
  /** this migration's entry in the outcome table, when the source may ask (CAP_RESOLVE) */
  outcome: SessionOutcome | undefined;
  /** the source was sent an ERROR already (an extra channel's failure) */
  toldSource = false;
  /** post-copy's fault service, as soon as it exists (a failure before the guest runs stops it) */
  faults: FaultService | undefined;
  /** from the device state on, COMMIT may be on its way: a failure may leave the source asking */
  deviceStateSeen = false;
  /** the source ended the migration itself (ABORT): it knows why, and asks nothing */
  sourceSaidWhy = false;
  /** gives the bytes taken at HELLO back to the shared budget */
  releaseMemory: (() => void) | undefined;

  constructor(m: MigrationToServe) {
    this.conn = m.admitted.conn;
    this.peer = m.admitted.security.peer ?? m.admitted.remote;
    this.outcomes = m.outcomes;
    this.localAddress = m.admitted.local;
    this.security = m.admitted.security;
    this.options = m.options;
    this.sessions = m.sessions;
    this.#onProgress = m.options.onProgress ?? (() => undefined);
  }

  get stage(): ReceiverState {
    return this.#stages.current;
  }

  /** The one place the stage changes; a transition the table does not allow is a bug here. */
  enter(next: ReceiverState): void {
    this.#stages.enter(next);
  }

  /** Records a failure; returns the stage it happened in. */
  fail(): ReceiverState {
    return this.#stages.fail();
  }

  progress(e: ReceiveProgress): void {
    this.#onProgress(e);
  }

  regionsReport(): ReceiveReport['regions'] {
    return (this.layout?.regions ?? []).map((r) => ({ id: r.id, name: r.name, bytes: r.size }));
  }

  /**
   * Ends this migration from here (a daemon shutting down), but only before the device state
   * came: the source has not paused its guest, let alone committed, and resumes nothing. Later
   * the pause is short and a COMMIT may be on its way: that migration is left to finish.
   */
  abortBeforeDeviceState(reason: LivemigError): boolean {
    const s = this.stage;
    if (this.deviceStateSeen || (s !== 'hello' && s !== 'reserve' && s !== 'receiving')) return false;
    this.conn.abort(reason);
    return true;
  }

  /** Whatever the outcome: the memory budget, the extra channels and the session are given back. */
  endSession(): void {
    this.releaseMemory?.();
    this.releaseMemory = undefined;
    this.channels?.close();
    if (this.session) this.sessions.end(this.session);
  }
}
