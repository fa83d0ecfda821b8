/**
 * The destination daemon's memory budget: what migrations arriving at once may reserve
 * together. Each takes its region's bytes at HELLO, before anything is allocated, or is refused
 * whole (ERR_LIVEMIG_NO_MEMORY): never half-reserved. The bytes go back when the migration
 * ends; an activated guest's memory is then the host's, and the next admission sees it gone
 * from MemAvailable.
 */
import { LivemigError } from '../errors.js';
import { memoryBudget } from '../receiver/memory-budget.js';

export class MemoryBudget {
  /** the operator's limit (--memory-budget); undefined: what the host can hold at each admission */
  readonly limit: number | undefined;
  #reserved = 0;
  #peak = 0;
  readonly #host: () => { bytes: number; why: string } | undefined;

  constructor(limit: number | undefined, host: () => { bytes: number; why: string } | undefined = memoryBudget) {
    if (limit !== undefined && !(Number.isSafeInteger(limit) && limit >= 0))
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `a memory budget is a whole number of bytes, got ${limit}`, { phase: 'validate' });
    this.limit = limit;
    this.#host = host;
  }

  get reserved(): number {
    return this.#reserved;
  }
  get peak(): number {
    return this.#peak;
  }

  /**
   * The bytes now, or a refusal. Without a limit, the host's free memory now bounds what all
   * running admissions hold: it counts the ones already populated twice (they also left
   * MemAvailable), which errs on refusing, never on overcommitting.
   */
  take(bytes: number, o: { local: boolean }): () => void {
    if (o.local) return () => undefined; // a same-host upgrade maps the source guest's own memory
    const host = this.limit === undefined ? this.#host() : undefined;
    const limit = this.limit ?? host?.bytes;
    if (limit !== undefined && this.#reserved + bytes > limit) {
      const what =
        this.limit !== undefined ? `the memory budget of ${limit} bytes (--memory-budget)` : `what this host can hold now (${limit} bytes: ${host!.why})`;
      throw new LivemigError(
        'ERR_LIVEMIG_NO_MEMORY',
        `a region of ${bytes} bytes does not fit ${what}: ${this.#reserved} bytes are reserved by migrations arriving now`,
        { phase: 'reserve' },
      );
    }
    this.#reserved += bytes;
    this.#peak = Math.max(this.#peak, this.#reserved);
    let given = false;
    return () => {
      if (given) return;
      given = true;
      this.#reserved -= bytes;
    };
  }
}
