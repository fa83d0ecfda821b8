/**
 * The daemon's migrations outlive it: at start it takes back what its history file
 * (history-store.ts) kept of its earlier runs, so that GET /v1/migrations[/:id] and the event
 * replay answer for them as for its own, and from then on it writes every migration's record
 * and events as they happen (progress excepted: the latest is only ever shown).
 *
 * A migration the earlier run did not finish (the daemon was killed, or crashed, during it)
 * comes back `failed`, ERR_LIVEMIG_DAEMON_STOPPED: nothing runs it any more, and its outcome is
 * not known here. The bounds are the table's: what it forgets (the oldest ended migrations
 * beyond --history-migrations), the file forgets; each migration keeps its newest
 * --history-events events, as the event bus does.
 *
 * A write that fails (a full disk) does not stop a migration: it is counted, traced, shown in
 * /v1/health and told once (onFailure) until a write succeeds again.
 */
import { LivemigError } from '../errors.js';
import { trace } from '../trace.js';
import { DaemonEvent as Trace } from '../trace-events.js';
import { MIGRATION_HISTORY, type DaemonEvent, type EventBus } from './events.js';
import { FINAL, Migration, type MigrationTable } from './migration.js';
import { HistoryStore, historyError, type MigrationRecord } from './history-store.js';

/**
 * Commits between checkpoints when migrations never stop (the WAL's size, about two pages each):
 * otherwise the WAL is moved into the file when the last migration in flight ends.
 */
const CHECKPOINT_EVERY = 2000;
/** a checkpoint when idle waits for this many commits (a crowd of refusals is no reason for one each) */
const CHECKPOINT_AT_LEAST = 64;

export interface HistoryConfig {
  /** the history file (`livemig serve`: --state-dir/history.db) */
  file: string;
  /** ended migrations kept, the newest (refused sources apart: the table's REFUSED_KEPT); default FINISHED_KEPT */
  keepMigrations?: number;
  /** events kept per migration, the newest; default MIGRATION_HISTORY */
  keepEvents?: number;
  /** a write failed, after one had succeeded (or the first): told once until one succeeds again */
  onFailure?(e: LivemigError): void;
}

export class MigrationHistory {
  readonly #store: HistoryStore;
  readonly #keepEvents: number;
  readonly #onFailure: ((e: LivemigError) => void) | undefined;
  #table: MigrationTable | undefined;
  #failures = 0;
  #lastFailure: { code: string; message: string; at: string } | undefined;
  #failing = false;
  #sinceCheckpoint = 0;
  #restored = { migrations: 0, interrupted: 0 };

  private constructor(store: HistoryStore, keepEvents: number, onFailure: ((e: LivemigError) => void) | undefined) {
    this.#store = store;
    this.#keepEvents = keepEvents;
    this.#onFailure = onFailure;
  }

  get file(): string {
    return this.#store.file;
  }

  /** what the start found: migrations taken back (within the bounds), and those of them the daemon had stopped during */
  get restored(): { migrations: number; interrupted: number } {
    return this.#restored;
  }

  /** Opens the file (ERR_LIVEMIG_HISTORY when it cannot be created, is damaged, or another daemon holds it). */
  static open(c: HistoryConfig): MigrationHistory {
    return new MigrationHistory(HistoryStore.open(c.file), c.keepEvents ?? MIGRATION_HISTORY, c.onFailure);
  }

  /**
   * Fills `table` and `bus` with what the file kept (oldest first, so that the table's bounds
   * forget the oldest), records every event published from now on, and ends the migrations the
   * daemon stopped during (their final `state` event is written like any other).
   */
  attach(table: MigrationTable, bus: EventBus): void {
    const { migrations, events, lastEventId } = this.#store.load();
    bus.restore(events, lastEventId);
    const restored = migrations.map((s) => ({ m: Migration.restore(s, bus), updatedAt: s.updatedAt }));
    for (const r of restored) table.add(r.m);
    this.#table = table;
    bus.subscribe((e) => this.#record(e));
    const unfinished = restored.filter((r) => !r.m.done);
    for (const r of unfinished) r.m.endInterrupted(r.updatedAt);
    this.#restored = { migrations: table.list().length, interrupted: unfinished.length };
  }

  /** The table forgot `id`: so does the file. */
  forget(id: string): void {
    this.#try('deleting an old migration', () => this.#store.forget(id));
  }

  describe(): Record<string, unknown> {
    return {
      file: this.#store.file,
      restored: this.#restored.migrations,
      interrupted: this.#restored.interrupted,
      write_failures: this.#failures,
      ...(this.#lastFailure ? { last_failure: this.#lastFailure } : {}),
    };
  }

  close(): void {
    this.#try('closing it', () => this.#store.close());
  }

  #record(e: DaemonEvent): void {
    if (e.type === 'progress') return;
    const m = this.#table?.find(e.migration);
    if (!m) {
      // every event's migration is in the table while it publishes: a bug if not
      const why = `event ${e.id} (${e.type}) of migration ${e.migration}, which the table does not hold`;
      this.#failed(new LivemigError('ERR_LIVEMIG_INTERNAL', why, { phase: 'history' }));
      return;
    }
    const { rounds_done: _rounds, ...record } = m.view({ detail: false });
    const wrote = this.#try(`writing event ${e.id} (${e.type}) of migration ${m.id}`, () =>
      this.#store.record(record as unknown as MigrationRecord, e.type === 'report' ? m.report : undefined, e, this.#keepEvents),
    );
    if (wrote) this.#sinceCheckpoint++;
    if (e.type === 'state' && FINAL.includes(m.state)) this.#maybeCheckpoint();
  }

  /** A migration ended: the WAL goes into the file if nothing else is in flight (or it has grown long regardless). */
  #maybeCheckpoint(): void {
    const idle = this.#table!.active().length === 0;
    if (this.#sinceCheckpoint >= CHECKPOINT_EVERY || (idle && this.#sinceCheckpoint >= CHECKPOINT_AT_LEAST)) {
      if (this.#try('checkpointing it', () => this.#store.checkpoint())) this.#sinceCheckpoint = 0;
    }
  }

  #try(doing: string, fn: () => void): boolean {
    try {
      fn();
      this.#failing = false;
      return true;
    } catch (e) {
      this.#failed(historyError(this.#store.file, doing, e));
      return false;
    }
  }

  #failed(err: LivemigError): void {
    this.#failures++;
    this.#lastFailure = { code: err.code, message: err.message, at: new Date().toISOString() };
    trace('daemon', Trace.historyFailed, { code: err.code, reason: err.message });
    if (this.#failing) return;
    this.#failing = true;
    this.#onFailure?.(err);
  }
}
