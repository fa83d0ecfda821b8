/**
 * One migration as the daemon shows it: outgoing (it moves a registered guest away) or incoming
 * (a source's migration arriving here). Its state, stage, progress, rounds and outcome; every
 * change is an event on the bus.
 *   queued -> running -> completed | failed | cancelled   (queued -> cancelled, too)
 * An incoming source the destination refused (authentication, busy, memory, ...) is kept as a
 * migration in state `refused`, with why: queued -> refused (running -> refused when it was
 * refused after its HELLO was taken, while reserving).
 */
import { randomUUID } from 'node:crypto';
import { LivemigError } from '../errors.js';
import type { MigrationControl, MigrationReport, RoundStats } from '../source/types.js';
import type { ReceiveReport } from '../receiver/types.js';
import type { Refusal, RefusalReason } from '../refusals.js';
import type { EventBus } from './events.js';
import { Progress, type ProgressSample, type ProgressView } from './progress.js';

export type MigrationState = 'queued' | 'running' | 'completed' | 'failed' | 'cancelled' | 'refused';
export type Direction = 'outgoing' | 'incoming';

/** progress is sampled this often per migration */
export const PROGRESS_INTERVAL_MS = 250;
/**
 * ... and published unless one went out less than this ago: a little under the interval, so a
 * sample that comes a moment early is not dropped (that would leave 500 ms without one)
 */
const PROGRESS_GAP_MS = 0.8 * PROGRESS_INTERVAL_MS;

export const MIGRATION_STATES: readonly MigrationState[] = ['queued', 'running', 'completed', 'failed', 'cancelled', 'refused'];
export const FINAL: readonly MigrationState[] = ['completed', 'failed', 'cancelled', 'refused'];

/**
 * The stages in the order a migration passes them, both directions in one list (outgoing:
 * connecting, precopy, stop-and-copy, activating, activated or postcopy, done; incoming:
 * reserve, receiving, committed, postcopy, done). A migration's stage only moves forward in
 * it: the engine's events may come later than the step they report (the stop-and-copy's page
 * count is told after the commitment, post-copy's activation once post-copy runs), and an
 * operator reading the stream must never see it go back. A post-copy migration's guest is
 * activated as post-copy begins: `postcopy` comes after `activated`, which it then skips.
 */
export const STAGES = [
  'queued',
  'connecting',
  'reserve',
  'precopy',
  'receiving',
  'stop-and-copy',
  'committed',
  'activating',
  'activated',
  'postcopy',
  'done',
] as const;
export type Stage = (typeof STAGES)[number];

export interface MigrationSettings {
  mode: 'precopy' | 'postcopy' | 'hybrid';
  downtime_limit_ms: number | undefined;
  bandwidth_mib_s: number | undefined;
  /** post-copy's push, its own cap (none by default) */
  postcopy_bandwidth_mib_s: number | undefined;
  deadline_s: number | undefined;
  on_stall: string | undefined;
  encodings: boolean;
}

/** A migration as the history (history.ts) keeps it: its view without rounds, and what it kept apart. */
export interface StoredMigration {
  view: {
    id: string;
    direction: Direction;
    guest: string;
    peer: string;
    state: MigrationState;
    stage: string;
    created_at: string;
    started_at?: string;
    finished_at?: string;
    progress: ProgressView;
    settings: MigrationSettings;
    source_guest?: 'running' | 'paused' | 'released';
    error?: { code: string; phase: string | undefined; message: string };
    refusal?: { reason: RefusalReason; from: string; peer_name?: string };
  };
  report: MigrationReport | ReceiveReport | undefined;
  /** its rounds, from the round events kept */
  rounds: RoundStats[];
  /** when the history last wrote of it */
  updatedAt: Date;
}

export class Migration {
  readonly id: string;
  readonly direction: Direction;
  readonly guest: string;
  /** the other daemon: where it goes (host:port), or who it came from */
  readonly peer: string;
  readonly createdAt: Date;
  startedAt: Date | undefined;
  finishedAt: Date | undefined;
  #state: MigrationState = 'queued';
  stage = 'queued';
  readonly rounds: RoundStats[] = [];
  report: MigrationReport | ReceiveReport | undefined;
  error: { code: string; phase: string | undefined; message: string } | undefined;
  /** an incoming source refused here: why (one of REFUSAL_REASONS), where from, and its name when its certificate chains to our CA */
  refusal: { reason: RefusalReason; from: string; peer_name?: string } | undefined;
  /** outgoing: what became of the guest here (running, paused, released) */
  sourceGuest: 'running' | 'paused' | 'released' | undefined;
  readonly progress: Progress;
  readonly settings: MigrationSettings;
  readonly control: MigrationControl | undefined;
  readonly #bus: EventBus;
  #lastProgress = 0;
  /** ends a queued migration before it starts */
  onCancelQueued: (() => void) | undefined;
  /** resolved once the migration passed its handshake, or ended */
  readonly admitted: Promise<void>;
  #admit!: () => void;

  constructor(o: {
    direction: Direction;
    guest: string;
    peer: string;
    totalBytes: number;
    settings: MigrationSettings;
    control?: MigrationControl;
    bus: EventBus;
    /** a migration of an earlier run, restored: its id and birth */
    id?: string;
    createdAt?: Date;
  }) {
    this.id = o.id ?? randomUUID();
    this.createdAt = o.createdAt ?? new Date();
    this.direction = o.direction;
    this.guest = o.guest;
    this.peer = o.peer;
    this.settings = o.settings;
    this.control = o.control;
    this.progress = new Progress(o.totalBytes);
    this.#bus = o.bus;
    this.admitted = new Promise((resolve) => (this.#admit = resolve));
  }

  /**
   * A migration of an earlier run of the daemon, as its history kept it (ended: nothing controls
   * it any more). One the daemon stopped during is restored as it was, to be ended by
   * endInterrupted().
   */
  static restore(s: StoredMigration, bus: EventBus): Migration {
    const v = s.view;
    const m = new Migration({
      id: v.id,
      createdAt: new Date(v.created_at),
      direction: v.direction,
      guest: v.guest,
      peer: v.peer,
      totalBytes: v.progress.total_bytes,
      settings: v.settings,
      bus,
    });
    m.#state = v.state;
    m.stage = v.stage;
    if (v.started_at !== undefined) m.startedAt = new Date(v.started_at);
    if (v.finished_at !== undefined) m.finishedAt = new Date(v.finished_at);
    m.progress.restore(v.progress);
    m.sourceGuest = v.source_guest;
    m.error = v.error;
    m.refusal = v.refusal;
    m.rounds.push(...s.rounds);
    m.report = s.report;
    m.#admit();
    return m;
  }

  /** Restored unfinished: the daemon stopped during it. It ends failed, as of when the history last heard of it (`lastSeen`). */
  endInterrupted(lastSeen: Date): void {
    const err = new LivemigError(
      'ERR_LIVEMIG_DAEMON_STOPPED',
      `the daemon stopped during it (at stage ${this.stage}): its next start found it unfinished, and its outcome is not known here; ` +
        `ask ${this.direction === 'outgoing' ? 'the destination' : 'the source'}'s daemon (${this.peer}), and see where the guest runs`,
      { phase: this.stage },
    );
    this.error = { code: err.code, phase: err.phase, message: err.message };
    this.setState('failed', lastSeen);
  }

  get state(): MigrationState {
    return this.#state;
  }
  get done(): boolean {
    return FINAL.includes(this.#state);
  }

  setState(next: MigrationState, at = new Date()): void {
    if (this.done) throw new LivemigError('ERR_LIVEMIG_STATE', `internal: migration ${this.id} is ${this.#state} already`, { phase: 'daemon' });
    this.#state = next;
    if (next === 'running') this.startedAt = at;
    if (this.done) {
      this.finishedAt = at;
      this.#admit();
    }
    this.#bus.publish(this.id, 'state', { state: next, stage: this.stage, ...(this.error ? { error: this.error } : {}) });
  }

  /** The handshake is done: the destination took the migration. */
  passedHandshake(): void {
    this.#admit();
  }

  /** Moves to `stage`, unless the migration has reached it or a later one already (STAGES). */
  setStage(stage: Stage): void {
    if (STAGES.indexOf(stage) <= STAGES.indexOf(this.stage as Stage)) return;
    this.stage = stage;
    this.#bus.publish(this.id, 'stage', { stage });
  }

  addRound(r: RoundStats): void {
    this.rounds.push(r);
    this.#bus.publish(this.id, 'round', { ...r });
  }

  /**
   * New progress; published unless one went out less than PROGRESS_GAP_MS ago (`now`:
   * always, for a step the watcher must not miss, as a round's end).
   */
  noteProgress(sample: ProgressSample, o: { now?: boolean } = {}): void {
    const v = this.progress.update(sample);
    this.#publishProgress(v, { force: o.now ?? false });
  }

  #publishProgress(v: ProgressView, o: { force: boolean }): void {
    const t = performance.now();
    if (!o.force && t - this.#lastProgress < PROGRESS_GAP_MS) return;
    this.#lastProgress = t;
    this.#bus.publish(this.id, 'progress', { ...v, stage: this.stage });
  }

  complete(report: MigrationReport | ReceiveReport): void {
    this.report = report;
    this.#publishProgress(this.progress.complete(), { force: true });
    this.#bus.publish(this.id, 'report', { report });
    this.setStage('done');
    this.setState('completed');
  }

  fail(e: unknown): void {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_ABORTED', (e as Error).message, { phase: this.stage, cause: e });
    this.error = { code: err.code, phase: err.phase, message: err.message };
    this.setState(err.code === 'ERR_LIVEMIG_CANCELLED' ? 'cancelled' : 'failed');
  }

  /** An incoming source refused here: the migration ends as `refused`, with why. */
  refuse(r: Refusal): void {
    this.error = { code: r.code, phase: r.phase, message: r.message };
    this.refusal = { reason: r.reason, from: r.from, ...(r.peer !== undefined ? { peer_name: r.peer } : {}) };
    this.stage = r.phase; // one event, not two: the state event carries the stage (a crowd's refusals are many)
    this.setState('refused');
  }

  view(o: { detail?: boolean } = {}): Record<string, unknown> {
    const { detail = true } = o;
    return {
      id: this.id,
      direction: this.direction,
      guest: this.guest,
      peer: this.peer,
      state: this.#state,
      stage: this.stage,
      created_at: this.createdAt.toISOString(),
      ...(this.startedAt ? { started_at: this.startedAt.toISOString() } : {}),
      ...(this.finishedAt ? { finished_at: this.finishedAt.toISOString() } : {}),
      progress: this.progress.view,
      settings: this.settings,
      ...(this.sourceGuest ? { source_guest: this.sourceGuest } : {}),
      ...(this.error ? { error: this.error } : {}),
      ...(this.refusal ? { refusal: this.refusal } : {}),
      ...(detail ? { rounds: this.rounds } : { rounds_done: this.rounds.length }),
      ...(detail && this.report ? { report: this.report } : {}),
    };
  }
}

/**
 * Migrations by id; finished ones are kept (the latest `finishedKept`, FINISHED_KEPT unless the
 * daemon was told otherwise) for status queries, and refused ones apart (the latest
 * REFUSED_KEPT): a crowd of refused connections neither grows the table nor pushes the
 * migrations that ran out of it. What it forgets, the history (history.ts) forgets too.
 */
export const FINISHED_KEPT = 1000;
export const REFUSED_KEPT = 100;

export class MigrationTable {
  readonly #all = new Map<string, Migration>();
  readonly #bus: EventBus;
  readonly #finishedKept: number;
  readonly #onForget: ((id: string) => void) | undefined;

  constructor(bus: EventBus, o: { finishedKept?: number | undefined; onForget?: (id: string) => void } = {}) {
    this.#bus = bus;
    this.#finishedKept = o.finishedKept ?? FINISHED_KEPT;
    this.#onForget = o.onForget;
    // one that ends may take the table past its bounds: the oldest go once every subscriber
    // (the history's writer among them) has had the event
    bus.subscribe((e) => {
      if (e.type === 'state' && FINAL.includes(e.data['state'] as MigrationState)) queueMicrotask(() => this.#prune());
    });
  }

  add(m: Migration): void {
    this.#all.set(m.id, m);
    this.#prune();
  }

  #prune(): void {
    const all = [...this.#all.values()];
    this.#keepLatest(
      all.filter((x) => x.state === 'refused'),
      REFUSED_KEPT,
    );
    this.#keepLatest(
      all.filter((x) => x.done && x.state !== 'refused'),
      this.#finishedKept,
    );
  }

  /** Forgets the oldest of `ended` (in the order they were added) beyond the latest `kept`. */
  #keepLatest(ended: Migration[], kept: number): void {
    for (const old of ended.slice(0, Math.max(0, ended.length - kept))) {
      this.#all.delete(old.id);
      this.#bus.forget(old.id);
      this.#onForget?.(old.id);
    }
  }

  /** The migration `id`, if this daemon knows it. */
  find(id: string): Migration | undefined {
    return this.#all.get(id);
  }

  get(id: string): Migration {
    const m = this.#all.get(id);
    if (!m) throw new LivemigError('ERR_LIVEMIG_NOT_FOUND', `no migration ${JSON.stringify(id)} here`, { phase: 'validate' });
    return m;
  }

  list(): Migration[] {
    return [...this.#all.values()];
  }

  active(direction?: Direction): Migration[] {
    return this.list().filter((m) => !m.done && (direction === undefined || m.direction === direction));
  }
}
