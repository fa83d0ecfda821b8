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

const FINAL: readonly MigrationState[] = ['completed', 'failed', 'cancelled', 'refused'];

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

export class Migration {
  readonly id = randomUUID();
  readonly direction: Direction;
  readonly guest: string;
  /** the other daemon: where it goes (host:port), or who it came from */
  readonly peer: string;
  readonly createdAt = new Date();
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
  }) {
    this.direction = o.direction;
    this.guest = o.guest;
    this.peer = o.peer;
    this.settings = o.settings;
    this.control = o.control;
    this.progress = new Progress(o.totalBytes);
    this.#bus = o.bus;
    this.admitted = new Promise((resolve) => (this.#admit = resolve));
  }

  get state(): MigrationState {
    return this.#state;
  }
  get done(): boolean {
    return FINAL.includes(this.#state);
  }

  setState(next: MigrationState): void {
    if (this.done) throw new LivemigError('ERR_LIVEMIG_STATE', `internal: migration ${this.id} is ${this.#state} already`, { phase: 'daemon' });
    this.#state = next;
    if (next === 'running') this.startedAt = new Date();
    if (this.done) {
      this.finishedAt = new Date();
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
 * Migrations by id; finished ones are kept (the latest FINISHED_KEPT) for status queries, and
 * refused ones apart (the latest REFUSED_KEPT): a crowd of refused connections neither grows
 * the table nor pushes the migrations that ran out of it.
 */
const FINISHED_KEPT = 1000;
export const REFUSED_KEPT = 100;

export class MigrationTable {
  readonly #all = new Map<string, Migration>();
  readonly #bus: EventBus;

  constructor(bus: EventBus) {
    this.#bus = bus;
  }

  add(m: Migration): void {
    this.#all.set(m.id, m);
    const all = [...this.#all.values()];
    this.#keepLatest(
      all.filter((x) => x.state === 'refused'),
      REFUSED_KEPT,
    );
    this.#keepLatest(
      all.filter((x) => x.done && x.state !== 'refused'),
      FINISHED_KEPT,
    );
  }

  /** Forgets the oldest of `ended` (in the order they were added) beyond the latest `kept`. */
  #keepLatest(ended: Migration[], kept: number): void {
    for (const old of ended.slice(0, Math.max(0, ended.length - kept))) {
      this.#all.delete(old.id);
      this.#bus.forget(old.id);
    }
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
