/**
 * A total bandwidth cap shared fairly by the daemon's outgoing migrations (--bandwidth).
 * Max-min fairness: a migration that asked for less than an equal share gets what it asked for,
 * and the rest is split equally among the others. Shares are recomputed whenever a migration
 * starts, ends or changes its own cap.
 */
import type { MigrationControl } from '../source/types.js';

interface Member {
  control: MigrationControl;
  /** the migration's own cap, MiB/s (undefined: as much as it gets) */
  wanted: number | undefined;
}

export class BandwidthShare {
  #total: number | undefined;
  readonly #members = new Map<string, Member>();

  constructor(totalMiBps: number | undefined) {
    this.#total = totalMiBps;
  }

  get total(): number | undefined {
    return this.#total;
  }

  join(id: string, control: MigrationControl, wanted: number | undefined): void {
    this.#members.set(id, { control, wanted });
    this.#rebalance();
  }

  /** A migration's own cap changed (PATCH). */
  want(id: string, wanted: number | undefined): void {
    const m = this.#members.get(id);
    if (!m) return;
    m.wanted = wanted;
    this.#rebalance();
  }

  leave(id: string): void {
    if (this.#members.delete(id)) this.#rebalance();
  }

  /** What each member gets now, MiB/s (undefined: no cap). */
  shares(): Map<string, number | undefined> {
    const out = new Map<string, number | undefined>();
    const members = [...this.#members.entries()];
    if (this.#total === undefined) {
      for (const [id, m] of members) out.set(id, m.wanted);
      return out;
    }
    let left = this.#total;
    // the smallest asks first: each takes at most an equal share of what is left
    const order = members.sort((a, b) => (a[1].wanted ?? Infinity) - (b[1].wanted ?? Infinity));
    order.forEach(([id, m], i) => {
      const equal = left / (order.length - i);
      const give = Math.min(m.wanted ?? Infinity, equal);
      out.set(id, give);
      left -= give;
    });
    return out;
  }

  #rebalance(): void {
    const shares = this.shares();
    for (const [id, m] of this.#members) m.control.setBandwidth(shares.get(id));
  }
}
