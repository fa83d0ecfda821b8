/**
 * What became of each migration a listener accepted with the `resolve` capability, by session
 * token, so that a source whose commitment went unconfirmed (the link died after COMMIT) can
 * ask on a new connection (RESOLVE) instead of guessing. Asked while the migration has not
 * begun to activate, the answer is `not-activated` and the session is fenced: it will never
 * activate, whatever arrives later on its old connection. Asked during activation, the
 * answer waits for its result.
 */
export type SessionState = 'running' | 'activating' | 'activated' | 'fenced';

export class SessionOutcome {
  #state: SessionState = 'running';
  #waiters: ((s: 'activated' | 'fenced') => void)[] = [];
  /** what fencing must end now (the migration still holding the session's connection and region) */
  onFence: (() => void) | undefined;

  get state(): SessionState {
    return this.#state;
  }

  /** Activation begins; false if the session was fenced (then it must not activate). */
  beginActivation(): boolean {
    if (this.#state !== 'running') return false;
    this.#state = 'activating';
    return true;
  }

  settle(s: 'activated' | 'fenced'): void {
    if (this.#state === 'activated' || this.#state === 'fenced') return;
    this.#state = s;
    for (const w of this.#waiters.splice(0)) w(s);
  }

  /** The answer to RESOLVE: fences a session that has not begun to activate. */
  async resolve(): Promise<'activated' | 'fenced'> {
    if (this.#state === 'running') {
      this.settle('fenced');
      this.onFence?.();
    }
    if (this.#state === 'activated' || this.#state === 'fenced') return this.#state;
    return new Promise((r) => this.#waiters.push(r));
  }
}

/** The listener's sessions, newest kept: a bounded table (a source asks soon after it lost the link, or not at all). */
export class OutcomeTable {
  readonly #byToken = new Map<string, SessionOutcome>();
  readonly #max: number;

  constructor(max = 1024) {
    this.#max = max;
  }

  open(token: string): SessionOutcome {
    const o = new SessionOutcome();
    this.#byToken.set(token, o);
    // the oldest settled ones go first; a running one is never dropped
    for (const [t, old] of this.#byToken) {
      if (this.#byToken.size <= this.#max) break;
      if (old.state === 'activated' || old.state === 'fenced') this.#byToken.delete(t);
    }
    return o;
  }

  get(token: string): SessionOutcome | undefined {
    return this.#byToken.get(token);
  }
}
