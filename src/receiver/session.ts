/**
 * A post-copy session at the destination: the connections that join it (ATTACH naming its
 * token), and who waits for which. The migration's own connection switches to post-copy; the
 * priority connection joins before the switch, and after a break both join again. Each role
 * has one slot (a newer connection replaces an older one) and waiting is per role, with a
 * timeout, so nothing is lost between the listener that routes a connection and the migration
 * that takes it.
 */
import { randomBytes } from 'node:crypto';
import { LivemigError } from '../errors.js';
import type { FramedConnection } from '../protocol/connection.js';

/** A connection's place in a session: post-copy's push and priority connections, or an extra channel. */
export type SessionSlot = 'push' | 'prio' | `channel-${number}`;

export class PostcopySession {
  readonly token = randomBytes(16).toString('hex');
  /**
   * The page table the switch fills from POSTCOPY's bitmap, made and touched when the session
   * opens (at reservation) so that the switch, inside the pause, does not fault its memory in.
   */
  readonly neededTable: Uint8Array;
  readonly #slots: Partial<Record<SessionSlot, FramedConnection>> = {};
  readonly #waiters = new Set<() => void>();
  #closed = false;

  /** connections granted for pre-copy (CAP_CHANNELS), the migration's own included */
  readonly channels: number;

  constructor(pageCount: number, channels = 1) {
    this.neededTable = new Uint8Array(pageCount).fill(1);
    this.channels = channels;
  }

  /** A connection joined as `role` (the listener routed its ATTACH here). */
  join(role: SessionSlot, conn: FramedConnection): void {
    if (this.#closed) {
      conn.close();
      return;
    }
    this.#slots[role]?.close(); // a newer connection for the same role replaces an older one
    this.#slots[role] = conn;
    for (const w of [...this.#waiters]) w();
  }

  /** Whether a connection waits in `role`'s slot. */
  has(role: SessionSlot): boolean {
    return this.#slots[role] !== undefined;
  }

  /**
   * Takes the connections of `roles` once all have joined; rejects with `onTimeout()`'s error
   * after `timeoutMs`. What is taken leaves the session.
   */
  async take<R extends SessionSlot>(roles: readonly R[], timeoutMs: number, onTimeout: () => LivemigError): Promise<Record<R, FramedConnection>> {
    const deadline = performance.now() + timeoutMs;
    while (!roles.every((r) => this.#slots[r])) {
      if (this.#closed) throw new LivemigError('ERR_LIVEMIG_STATE', 'the post-copy session is closed', { phase: 'postcopy' });
      const left = deadline - performance.now();
      if (left <= 0) throw onTimeout();
      await this.#wait(left);
    }
    const out = {} as Record<R, FramedConnection>;
    for (const r of roles) {
      out[r] = this.#slots[r]!;
      delete this.#slots[r];
    }
    return out;
  }

  /** Resolves once every one of `roles` has a connection waiting (or the session closed). */
  async joined(roles: readonly SessionSlot[]): Promise<void> {
    while (!this.#closed && !roles.every((r) => this.#slots[r])) await this.#wait(60_000);
  }

  /** Resolves at the next join, or after `ms`. */
  #wait(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.#waiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#waiters.add(done);
    });
  }

  /** Ends the session: connections still waiting in it are closed. */
  close(): void {
    this.#closed = true;
    for (const r of Object.keys(this.#slots) as SessionSlot[]) this.#slots[r]!.close();
    for (const w of [...this.#waiters]) w();
  }
}

/** The listener's sessions by token: how an ATTACH finds its migration. */
export class SessionTable {
  readonly #byToken = new Map<string, PostcopySession>();

  open(pageCount: number, channels = 1): PostcopySession {
    const s = new PostcopySession(pageCount, channels);
    this.#byToken.set(s.token, s);
    return s;
  }

  get(token: string): PostcopySession | undefined {
    return this.#byToken.get(token);
  }

  end(s: PostcopySession): void {
    s.close();
    this.#byToken.delete(s.token);
  }
}
