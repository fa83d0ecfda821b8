/**
 * The daemon's event stream: every state change, every round, progress (about every 250 ms
 * per migration) and the final report, each with a daemon-wide sequence number (the SSE event
 * id). Each migration keeps its own history, so that a client that subscribes after a
 * migration began still sees all of it (and one that reconnects with Last-Event-ID, the rest);
 * the daemon keeps the latest events of all migrations too.
 */

export type EventType = 'state' | 'round' | 'progress' | 'report' | 'stage';

export interface DaemonEvent {
  id: number;
  type: EventType;
  migration: string;
  data: Record<string, unknown>;
}

/** events kept per migration (a migration has at most ~30 rounds; progress is not kept) */
const MIGRATION_HISTORY = 512;
/** events kept across migrations, for /v1/events replay */
const DAEMON_HISTORY = 2048;

export class EventBus {
  #seq = 0;
  readonly #recent: DaemonEvent[] = [];
  readonly #history = new Map<string, DaemonEvent[]>();
  readonly #subscribers = new Set<(e: DaemonEvent) => void>();

  publish(migration: string, type: EventType, data: Record<string, unknown>): DaemonEvent {
    const e: DaemonEvent = { id: ++this.#seq, type, migration, data };
    // progress is only ever the latest: replaying it would show an old percentage
    if (type !== 'progress') {
      push(this.#recent, e, DAEMON_HISTORY);
      let h = this.#history.get(migration);
      if (!h) this.#history.set(migration, (h = []));
      push(h, e, MIGRATION_HISTORY);
    }
    for (const s of this.#subscribers) s(e);
    return e;
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
