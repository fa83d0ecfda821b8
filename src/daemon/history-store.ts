/**
 * The daemon's migration history on disk: one SQLite file (`livemig serve --state-dir DIR`:
 * DIR/history.db) holding each migration's record (id, direction, guest, peer, state, stage,
 * times, error code and message; the rest of its view as JSON), its final report, and its events
 * (state, stage, round, report: progress is not kept, as the event bus keeps none). history.ts
 * decides what is written when; this file is the SQL.
 *
 * SQLite through better-sqlite3: synchronous (a write is done when the call returns, in order
 * with the events), prepared statements, one transaction per event; WAL with synchronous=NORMAL,
 * so that a commit costs no fsync (a daemon that crashes loses nothing committed; a host that
 * loses power may lose the last commits, never the file). Checkpoints are the daemon's to run
 * (history.ts runs them when no migration is in flight): SQLite's own would fsync in whatever
 * write came at the time, a guest's pause included. The file is locked exclusively while the
 * daemon runs: a second daemon on the same directory is refused, not mixed in.
 */
import { closeSync, mkdirSync, openSync } from 'node:fs';
import path from 'node:path';
import Database from 'better-sqlite3';
import { LivemigError } from '../errors.js';
import type { MigrationReport, RoundStats } from '../source/types.js';
import type { ReceiveReport } from '../receiver/types.js';
import type { DaemonEvent, EventType } from './events.js';
import { MIGRATION_STATES, type StoredMigration } from './migration.js';

export const HISTORY_FILE = 'history.db';
/** the schema this livemig writes (PRAGMA user_version); a file of a later one is refused, not rewritten */
const SCHEMA_VERSION = 1;
/** how long opening waits for a lock another process holds, ms */
const LOCK_WAIT_MS = 1000;

const SCHEMA = `
CREATE TABLE migrations (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  direction TEXT NOT NULL,
  guest TEXT NOT NULL,
  peer TEXT NOT NULL,
  state TEXT NOT NULL,
  stage TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  started_at INTEGER,
  finished_at INTEGER,
  updated_at INTEGER NOT NULL,
  error_code TEXT,
  error_message TEXT,
  view TEXT NOT NULL,
  report TEXT
);
CREATE TABLE events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  migration TEXT NOT NULL REFERENCES migrations(id) ON DELETE CASCADE,
  type TEXT NOT NULL,
  data TEXT NOT NULL
);
CREATE INDEX events_by_migration ON events(migration, id);
`;

/** A migration's record as written: its view (without rounds: those are its round events) */
export type MigrationRecord = StoredMigration['view'];

const EVENT_TYPES: readonly EventType[] = ['state', 'round', 'progress', 'report', 'stage'];
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** What to do, by the code SQLite (or the file system) failed with (SQLite's extended codes begin with the primary one). */
const HINTS: { codes: string[]; say: string }[] = [
  {
    codes: ['SQLITE_NOTADB', 'SQLITE_CORRUPT'],
    say:
      ': it is not a history this livemig can read (damaged, or not its file). Move it away (with its -wal file) to keep it, and start again: ' +
      'the daemon begins a new one',
  },
  { codes: ['SQLITE_BUSY', 'SQLITE_LOCKED'], say: ': another process holds it (each daemon needs a --state-dir of its own)' },
  {
    codes: ['SQLITE_CANTOPEN', 'SQLITE_READONLY', 'SQLITE_PERM', 'EACCES', 'EPERM', 'EROFS', 'ENOTDIR', 'EISDIR'],
    say: ': give --state-dir a directory this daemon can write',
  },
  { codes: ['SQLITE_FULL', 'ENOSPC'], say: ': the file system is full' },
];

/** What a failure of SQLite (or of the file system under it) means for the operator. */
export function historyError(file: string, doing: string, e: unknown): LivemigError {
  const code = (e as { code?: string }).code ?? '';
  const hint = HINTS.find((h) => h.codes.some((c) => code.startsWith(c)))?.say ?? '';
  const why = e instanceof Error ? e.message : String(e);
  return new LivemigError('ERR_LIVEMIG_HISTORY', `the migration history ${file}: ${doing} failed (${code || 'error'}: ${why})${hint}`, {
    phase: 'history',
    cause: e,
  });
}

export class HistoryStore {
  readonly file: string;
  readonly #db: Database.Database;
  readonly #upsert: Database.Statement;
  readonly #insertEvent: Database.Statement;
  readonly #trimEvents: Database.Statement;
  readonly #forget: Database.Statement;
  readonly #write: (record: MigrationRecord, report: string | null, e: DaemonEvent, keepEvents: number) => void;

  private constructor(file: string, db: Database.Database) {
    this.file = file;
    this.#db = db;
    this.#upsert = db.prepare(
      `INSERT INTO migrations (id, direction, guest, peer, state, stage, created_at, started_at, finished_at, updated_at, error_code, error_message,
         view, report)
       VALUES (@id, @direction, @guest, @peer, @state, @stage, @created_at, @started_at, @finished_at, @updated_at, @error_code, @error_message,
         @view, @report)
       ON CONFLICT(id) DO UPDATE SET state = excluded.state, stage = excluded.stage, started_at = excluded.started_at,
         finished_at = excluded.finished_at, updated_at = excluded.updated_at, error_code = excluded.error_code,
         error_message = excluded.error_message, view = excluded.view, report = COALESCE(excluded.report, report)`,
    );
    this.#insertEvent = db.prepare('INSERT INTO events (id, migration, type, data) VALUES (?, ?, ?, ?)');
    // the newest `keep` of the migration's events stay (the index walks them from the newest)
    this.#trimEvents = db.prepare(
      'DELETE FROM events WHERE migration = ? AND id <= (SELECT id FROM events WHERE migration = ? ORDER BY id DESC LIMIT 1 OFFSET ?)',
    );
    this.#forget = db.prepare('DELETE FROM migrations WHERE id = ?');
    this.#write = db.transaction((record: MigrationRecord, report: string | null, e: DaemonEvent, keepEvents: number) => {
      this.#upsert.run(row(record, report));
      this.#insertEvent.run(e.id, e.migration, e.type, JSON.stringify(e.data));
      this.#trimEvents.run(e.migration, e.migration, keepEvents);
    });
  }

  /**
   * Opens (or creates, mode 0600 in a directory made 0700) the history file and takes its lock;
   * refuses one that is damaged, of a later schema, or held by another process
   * (ERR_LIVEMIG_HISTORY, saying which and what to do).
   */
  static open(file: string): HistoryStore {
    try {
      mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 });
      // created here, not by SQLite: its WAL file takes this mode from it
      closeSync(openSync(file, 'a', 0o600));
    } catch (e) {
      throw historyError(file, 'creating it', e);
    }
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { timeout: LOCK_WAIT_MS });
      // before WAL is entered: the lock is then taken for good, and no shared-memory index is made
      db.pragma('locking_mode = EXCLUSIVE');
      const mode = db.pragma('journal_mode = WAL', { simple: true });
      if (mode !== 'wal') throw new Error(`SQLite kept journal_mode ${String(mode)}, not wal`);
      db.pragma('synchronous = NORMAL');
      db.pragma('foreign_keys = ON');
      db.pragma('wal_autocheckpoint = 0');
      const check = db.pragma('quick_check', { simple: true });
      if (check !== 'ok') throw Object.assign(new Error(`quick_check: ${String(check)}`), { code: 'SQLITE_CORRUPT' });
      const version = Number(db.pragma('user_version', { simple: true }));
      if (version > SCHEMA_VERSION) throw new Error(`its schema is version ${version}, written by a later livemig (this one writes ${SCHEMA_VERSION})`);
      if (version === 0) {
        db.transaction(() => {
          db!.exec(SCHEMA);
          db!.pragma(`user_version = ${SCHEMA_VERSION}`);
        }).immediate();
      }
      return new HistoryStore(file, db);
    } catch (e) {
      db?.close();
      throw e instanceof LivemigError ? e : historyError(file, 'opening it', e);
    }
  }

  /** Writes `e` and the record of its migration as it now stands (`report`: its JSON, once it has one), in one transaction. */
  record(record: MigrationRecord, report: MigrationReport | ReceiveReport | undefined, e: DaemonEvent, keepEvents: number): void {
    this.#write(record, report === undefined ? null : JSON.stringify(report), e, keepEvents);
  }

  /** Deletes a migration and its events. */
  forget(id: string): void {
    this.#forget.run(id);
  }

  /** Moves what the WAL holds into the file, and empties the WAL. */
  checkpoint(): void {
    this.#db.pragma('wal_checkpoint(TRUNCATE)');
  }

  /** The last event id ever written (kept or deleted since): the daemon's next ids follow it. */
  #lastEventId(): number {
    const r = this.#db.prepare("SELECT seq FROM sqlite_sequence WHERE name = 'events'").get() as { seq: number } | undefined;
    return r?.seq ?? 0;
  }

  /**
   * Every migration kept, oldest first, with its report, its kept events (in id order) and its
   * rounds (from those events). A record that is not what this livemig writes is refused
   * (ERR_LIVEMIG_HISTORY): the file is read back as carefully as anything from outside.
   */
  load(): { migrations: StoredMigration[]; events: DaemonEvent[]; lastEventId: number } {
    try {
      return { ...this.#load(), lastEventId: this.#lastEventId() };
    } catch (e) {
      throw e instanceof LivemigError ? e : historyError(this.file, 'reading it', e);
    }
  }

  #load(): { migrations: StoredMigration[]; events: DaemonEvent[] } {
    const rows = this.#db.prepare('SELECT id, view, report, updated_at FROM migrations ORDER BY seq').all() as {
      id: string;
      view: string;
      report: string | null;
      updated_at: number;
    }[];
    const raw = this.#db.prepare('SELECT id, migration, type, data FROM events ORDER BY id').all() as {
      id: number;
      migration: string;
      type: string;
      data: string;
    }[];
    const events: DaemonEvent[] = [];
    const rounds = new Map<string, RoundStats[]>();
    for (const r of raw) {
      const data = this.#json(r.data, `event ${r.id}`);
      if (!(EVENT_TYPES as readonly string[]).includes(r.type) || !isObject(data)) throw this.#bad(`event ${r.id} (of type ${JSON.stringify(r.type)})`);
      events.push({ id: r.id, migration: r.migration, type: r.type as EventType, data });
      if (r.type === 'round') {
        let list = rounds.get(r.migration);
        if (!list) rounds.set(r.migration, (list = []));
        list.push(data as unknown as RoundStats);
      }
    }
    const migrations = rows.map((r) => {
      const view = checkView(this.#json(r.view, `migration ${r.id}`));
      if (!view || view.id !== r.id) throw this.#bad(`migration ${r.id}`);
      const report = r.report === null ? undefined : this.#json(r.report, `the report of ${r.id}`);
      if (report !== undefined && !isObject(report)) throw this.#bad(`the report of ${r.id}`);
      return { view, report: report as MigrationReport | ReceiveReport | undefined, rounds: rounds.get(r.id) ?? [], updatedAt: new Date(r.updated_at) };
    });
    return { migrations, events };
  }

  close(): void {
    if (this.#db.open) this.#db.close();
  }

  #json(text: string, what: string): unknown {
    try {
      return JSON.parse(text) as unknown;
    } catch {
      throw this.#bad(what);
    }
  }

  #bad(what: string): LivemigError {
    return historyError(this.file, 'reading it', Object.assign(new Error(`${what} is not as livemig writes it`), { code: 'SQLITE_CORRUPT' }));
  }
}

function row(v: MigrationRecord, report: string | null): Record<string, unknown> {
  const ms = (t: string | undefined): number | null => (t === undefined ? null : Date.parse(t));
  return {
    id: v.id,
    direction: v.direction,
    guest: v.guest,
    peer: v.peer,
    state: v.state,
    stage: v.stage,
    created_at: Date.parse(v.created_at),
    started_at: ms(v.started_at),
    finished_at: ms(v.finished_at),
    updated_at: Date.now(),
    error_code: v.error?.code ?? null,
    error_message: v.error?.message ?? null,
    view: JSON.stringify(v),
    report,
  };
}

function isObject(x: unknown): x is Record<string, unknown> {
  return typeof x === 'object' && x !== null && !Array.isArray(x);
}

const isTime = (x: unknown): boolean => typeof x === 'string' && !Number.isNaN(Date.parse(x));
const optional = (x: unknown, ok: (y: unknown) => boolean): boolean => x === undefined || ok(x);

/** The fields a restored migration relies on, checked; the view itself, or undefined. */
function checkView(x: unknown): MigrationRecord | undefined {
  if (!isObject(x)) return undefined;
  const p = x['progress'];
  const ok =
    typeof x['id'] === 'string' &&
    UUID.test(x['id']) &&
    (x['direction'] === 'outgoing' || x['direction'] === 'incoming') &&
    typeof x['guest'] === 'string' &&
    typeof x['peer'] === 'string' &&
    (MIGRATION_STATES as readonly unknown[]).includes(x['state']) &&
    typeof x['stage'] === 'string' &&
    isTime(x['created_at']) &&
    optional(x['started_at'], isTime) &&
    optional(x['finished_at'], isTime) &&
    isObject(p) &&
    ['percent', 'remaining_bytes', 'total_bytes', 'transferred_bytes'].every((k) => typeof p[k] === 'number') &&
    isObject(x['settings']) &&
    optional(x['source_guest'], (s) => s === 'running' || s === 'paused' || s === 'released') &&
    optional(x['error'], (e) => isObject(e) && typeof e['code'] === 'string' && typeof e['message'] === 'string') &&
    optional(x['refusal'], (r) => isObject(r) && typeof r['reason'] === 'string' && typeof r['from'] === 'string');
  return ok ? (x as unknown as MigrationRecord) : undefined;
}
