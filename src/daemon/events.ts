/**
 * The daemon's event stream: every state change, every round, progress (about every 250 ms
 * per migration) and the final report, each with a daemon-wide sequence number (the SSE event
 * id). Each migration keeps its own history, so that a client that subscribes after a
 * migration began still sees all of it (and one that reconnects with Last-Event-ID, the rest);
 * the daemon keeps the latest events of all migrations too. A daemon with a history on disk
 * (history.ts) writes each event as it is published, and at start takes back an earlier run's.
 */

export type EventType = 'state' | 'round' | 'progress' | 'report' | 'stage';

export interface DaemonEvent {
  id: number;
  type: EventType;
  migration: string;
  data: Record<string, unknown>;
}

/** events kept per migration, by default (a migration has at most ~30 rounds; progress is not kept) */
export const MIGRATION_HISTORY = 512;
/** events kept across migrations, for /v1/events replay */
const DAEMON_HISTORY = 2048;

export class EventBus {
  #seq = 0;
  readonly #perMigration: number;
  readonly #recent: DaemonEvent[] = [];
  readonly #history = new Map<string, DaemonEvent[]>();
  readonly #subscribers = new Set<(e: DaemonEvent) => void>();

  /** `perMigration`: events kept of each migration, the newest */
  constructor(o: { perMigration?: number | undefined } = {}) {
    this.#perMigration = o.perMigration ?? MIGRATION_HISTORY;
  }

  /**
   * Takes back the events of an earlier run of the daemon (in id order), kept as if published
   * then (sent to no one); ids go on after `lastId`, the last that run gave.
   */
  restore(events: readonly DaemonEvent[], lastId: number): void {
    for (const e of events) {
      let h = this.#history.get(e.migration);
      if (!h) this.#history.set(e.migration, (h = []));
      h.push(e);
      this.#seq = Math.max(this.#seq, e.id);
    }
    for (const h of this.#history.values()) if (h.length > this.#perMigration) h.splice(0, h.length - this.#perMigration);
    this.#recent.push(...events.slice(-DAEMON_HISTORY));
    this.#seq = Math.max(this.#seq, lastId);
  }

  publish(migration: string, type: EventType, data: Record<string, unknown>): DaemonEvent {
    const e: DaemonEvent = { id: ++this.#seq, type, migration, data };
    // progress is only ever the latest: replaying it would show an old percentage
    if (type !== 'progress') this.#keep(e);
    for (const s of this.#subscribers) s(e);
    return e;
  }

  #keep(e: DaemonEvent): void {
    push(this.#recent, e, DAEMON_HISTORY);
    let h = this.#history.get(e.migration);
    if (!h) this.#history.set(e.migration, (h = []));
    push(h, e, this.#perMigration);
  }

  /** Events kept of `migration` (all migrations: undefined) after `afterId`. */
  history(migration: string | undefined, afterId = 0): DaemonEvent[] {
    const h = migration === undefined ? this.#recent : (this.#history.get(migration) ?? []);
    return h.filter((e) => e.id > afterId);
  }

  subscribe(fn: (e: DaemonEvent) => void): () => void {
    this.#subscribers.add(fn);
    return () => void this.#subscribers.delete(fn);
  }

  forget(migration: string): void {
    this.#history.delete(migration);
  }
}

function push<T>(a: T[], x: T, max: number): void {
  a.push(x);
  if (a.length > max) a.splice(0, a.length - max);
}
