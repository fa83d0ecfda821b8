/**
 * A migration's progress as an operator sees it: a percentage that never runs backwards and an
 * ETA. The rule: progress is what no longer remains. percent = 100 x (1 - remaining / total),
 * where `remaining` is the bytes still to send if pre-copy stopped now (the pages due in this
 * round, or the dirty ones after it, or post-copy's pages not yet at the destination) and
 * `total` the guest's whole memory. A round that finds more dirty pages than the last left
 * would lower it: the percentage shown is the highest reached, and only completion makes it
 * 100. The ETA is what remains at the bandwidth achieved lately, plus the stop.
 */
import { FIXED_STOP_COST_MS } from '../precopy/policy.js';

export interface ProgressView {
  percent: number;
  /** seconds to completion if the guest wrote nothing more (undefined: not known yet) */
  eta_s: number | undefined;
  remaining_bytes: number;
  total_bytes: number;
  transferred_bytes: number;
}

export class Progress {
  #percent = 0;
  #view: ProgressView;

  constructor(totalBytes: number) {
    this.#view = { percent: 0, eta_s: undefined, remaining_bytes: totalBytes, total_bytes: totalBytes, transferred_bytes: 0 };
  }

  /** What remains now, and what went; `mbps`: the bandwidth achieved lately (MB/s). */
  update(remainingBytes: number, transferredBytes: number, mbps: number | undefined): ProgressView {
    const total = this.#view.total_bytes;
    const remaining = Math.min(Math.max(0, remainingBytes), total);
    const computed = total > 0 ? 100 * (1 - remaining / total) : 0;
    // 100 is completion's alone: a migration with nothing left still has its stop ahead
    this.#percent = Math.max(this.#percent, Math.min(99.9, computed));
    const eta = mbps !== undefined && mbps > 0 ? remaining / (mbps * 1e6) + FIXED_STOP_COST_MS / 1e3 : undefined;
    this.#view = {
      percent: round1(this.#percent),
      eta_s: eta === undefined ? undefined : +eta.toFixed(2),
      remaining_bytes: remaining,
      total_bytes: total,
      transferred_bytes: Math.max(this.#view.transferred_bytes, transferredBytes),
    };
    return this.#view;
  }

  complete(transferredBytes: number): ProgressView {
    this.#percent = 100;
    this.#view = { ...this.#view, percent: 100, eta_s: 0, remaining_bytes: 0, transferred_bytes: Math.max(this.#view.transferred_bytes, transferredBytes) };
    return this.#view;
  }

  /** Where a migration of an earlier run of the daemon was, as its history kept it. */
  restore(v: ProgressView): void {
    this.#percent = v.percent;
    this.#view = { ...v };
  }

  get view(): ProgressView {
    return this.#view;
  }
}

function round1(x: number): number {
  return Math.floor(x * 10) / 10;
}
