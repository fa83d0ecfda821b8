/**
 * A migration's stage, on either side: changed only through enter(), checked against the
 * table of which stage may follow which, so a wrong transition is an error here rather than a
 * guest resumed (or not) on a guess. Code that asks where a failure happened reads `current`.
 */
import { LivemigError } from './errors.js';

export class Stages<S extends string> {
  #current: S;
  readonly #next: { readonly [K in S]: readonly S[] };
  readonly #failed: S;

  constructor(initial: S, failed: S, next: { readonly [K in S]: readonly S[] }) {
    this.#current = initial;
    this.#failed = failed;
    this.#next = next;
  }

  get current(): S {
    return this.#current;
  }

  enter(next: S): void {
    if (!this.#next[this.#current].includes(next))
      throw new LivemigError('ERR_LIVEMIG_STATE', `internal: cannot go from ${this.#current} to ${next}`, { phase: this.#current });
    this.#current = next;
  }

  /** Records a failure (from any stage); returns the stage it happened in. */
  fail(): S {
    const failedIn = this.#current;
    this.#current = this.#failed;
    return failedIn;
  }
}
