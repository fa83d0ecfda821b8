/**
 * The convergence policy: after each pre-copy round, whether to go on, stop and copy, or act on
 * a guest that writes faster than we send. It only decides; the pre-copy rounds (src/source/rounds.ts) act.
 *
 * - Estimated downtime of stopping now: the pages still to send (dirty and held back, and those
 *   the guest dirties while a round is collected, which the pause carries too) at the slower of
 *   two costs: the recent bytes per page after encoding over the bandwidth achieved recently,
 *   and the time a page of the recent rounds took. Plus the fixed cost of the final steps. The
 *   second matters for scattered pages the guest just wrote: each is its own read of memory
 *   another CPU holds in its cache, ~15-40 us on a 2-vCPU host against ~4 us the bandwidth says;
 *   estimated by bandwidth alone, a pause of 956 pages took 63.9 ms against a 50 ms limit.
 *   Stop when it fits the downtime limit, unless one more (short) round should leave less than
 *   half behind: then the pause gets shorter still.
 * - Bounds: at most maxRounds rounds and maxBytes sent (default 3x the region, as Xen does);
 *   reaching one stops and copies with whatever is left (the downtime is reported). A stall
 *   detected in the same round acts first: the user chose what should happen then.
 * - Stall: in STALL_ROUNDS rounds in a row, what remains did not shrink by a tenth while
 *   not fitting the limit: the guest dirties as fast as we send. With the throttle policy, a
 *   guest that dirtied more than half as fast as we sent (SLOW_SHARE) in STALL_ROUNDS rounds in
 *   a row counts too, as with QEMU's throttle-trigger-threshold of 50%: it converges, but in so
 *   many rounds that the migration takes several times longer. Then the stall policy acts:
 *   throttle (auto-converge from THROTTLE_FIRST up to THROTTLE_MAX, like QEMU's cpu-throttle,
 *   in steps of at least THROTTLE_STEP that go straight to the level the guest's unthrottled
 *   rate calls for, as QEMU's cpu-throttle-tailslow does in spirit), postcopy, force (stop and
 *   copy now), or abort.
 * - Deadline: stop and copy when the next round could not finish in time but stopping now
 *   can; give up (source intact) when not even that fits.
 */
/**
 * Cost of the pause besides moving pages, ms: the integrator's pause (~2 ms for the reference
 * guest), the final collect (~0.5), the commit round trip with both digests (~2-4) and the
 * activation round trip (~2-5), as measured by bench/e2e on a 2-vCPU host. The convergence
 * policy and the daemon's ETA both add it.
 */
export const FIXED_STOP_COST_MS = 8;

export type StallAction = 'throttle' | 'postcopy' | 'force' | 'abort';

export const STALL_ROUNDS = 2;
const SHRINK = 0.9;
/** with the throttle policy: a dirty rate above this share of the bandwidth is too slow to converge */
export const SLOW_SHARE = 0.5;
export const THROTTLE_FIRST = 20;
export const THROTTLE_STEP = 10;
export const THROTTLE_MAX = 99;
/** below this many pages left, another round is not worth it */
const MIN_WORTH_A_ROUND = 64;
/** another round is worth it if it should leave less than this share of what is left now */
const WORTH_A_ROUND = 0.5;

export interface PolicyOptions {
  downtimeLimitMs: number;
  maxRounds: number;
  maxBytes: number;
  onStall: StallAction;
  /** ms from the start of the migration by which it must be done or given up */
  deadlineMs?: number;
  /** cost of the pause besides moving pages, ms */
  fixedCostMs: number;
}

export interface RoundFacts {
  round: number;
  pagesSent: number;
  bytesSent: number;
  durationMs: number;
  /** of durationMs, in the sends themselves (not waiting for the pacer), ms */
  sendingMs?: number;
  /** after the round, collecting what the guest dirtied, ms (the guest keeps writing meanwhile) */
  collectMs?: number;
  /** pages due for the next round, and held back as hot (not counted in dirtyPages) */
  dirtyPages: number;
  /** pages the guest dirtied during the round (its write rate, whatever the WWS holds back) */
  dirtiedPages: number;
  heldPages: number;
  /** since the migration started, ms; and bytes sent so far */
  elapsedMs: number;
  totalBytes: number;
  /** bandwidth achieved recently, MB/s (after encoding) */
  mbps: number;
  pageSize: number;
}

export type Decision =
  | { action: 'continue'; reason: string; estimateMs: number }
  | { action: 'stop'; reason: string; estimateMs: number; forced: boolean }
  | { action: 'throttle'; level: number; reason: string; estimateMs: number }
  | { action: 'postcopy' | 'abort'; reason: string; estimateMs: number; code: 'ERR_LIVEMIG_STALLED' | 'ERR_LIVEMIG_DEADLINE' };

export class ConvergencePolicy {
  readonly options: PolicyOptions;
  throttle = 0;
  #bytesPerPage: number | undefined;
  #msPerPage: number | undefined;
  #collectDirtied = 0;
  #remaining: number[] = [];
  #stallRounds = 0;
  #slowRounds = 0;

  constructor(options: PolicyOptions) {
    this.options = options;
  }

  /** Estimated downtime (ms) of stopping with `pages` left, from the facts of the last round. */
  estimate(pages: number, f: RoundFacts): number {
    const perPage = this.#bytesPerPage ?? f.pageSize;
    const byLink = perPage / 1e3 / Math.max(f.mbps, 1);
    return (pages + this.#collectDirtied) * Math.max(byLink, this.#msPerPage ?? 0) + this.options.fixedCostMs;
  }

  // eslint-disable-next-line max-lines-per-function -- 121 lines: the policy's rules in the order they apply (issue 30)
  decide(f: RoundFacts): Decision {
    const o = this.options;
    // bytes per page from rounds of dirty pages only: the first round's (zero pages left out,
    // duplicates) says little about pages the guest just wrote; until then, a whole page each
    if (f.round >= 2 && f.pagesSent >= 64) {
      const perPage = f.bytesSent / f.pagesSent;
      this.#bytesPerPage = this.#bytesPerPage === undefined ? perPage : 0.5 * this.#bytesPerPage + 0.5 * perPage;
      // the sends' own time: a round paced below the cap (rate adaptation) says nothing of the pause, which goes at the cap
      const msPerPage = (f.sendingMs ?? f.durationMs) / f.pagesSent;
      this.#msPerPage = this.#msPerPage === undefined ? msPerPage : 0.5 * this.#msPerPage + 0.5 * msPerPage;
    }
    // pages written while this round was collected, after their part of the scan: due at the pause besides those counted
    this.#collectDirtied = f.collectMs !== undefined ? Math.round((f.dirtiedPages / Math.max(f.durationMs, 0.001)) * f.collectMs) : 0;
    const remaining = f.dirtyPages + f.heldPages;
    const est = this.estimate(remaining, f);
    const fmt = (x: number): string => x.toFixed(2);
    const prev = this.#remaining.at(-1);
    this.#remaining.push(remaining);
    this.#stallRounds = prev !== undefined && remaining > prev * SHRINK ? this.#stallRounds + 1 : 0;
    const dirtyMbps = (f.dirtiedPages * f.pageSize) / 1e3 / Math.max(f.durationMs, 0.001);
    // counted like stalls, from the second round on (the first pass says little of a rate)
    this.#slowRounds = prev !== undefined && dirtyMbps > SLOW_SHARE * f.mbps ? this.#slowRounds + 1 : 0;

    if (est <= o.downtimeLimitMs) {
      // It fits; but while another round is short (it sends what is left, which fits the limit)
      // and would leave far less behind, it is worth its time: the pause gets shorter.
      const sendMs = est - o.fixedCostMs;
      const nextRemaining = f.heldPages + (f.dirtiedPages / Math.max(f.durationMs, 0.001)) * sendMs;
      const shrinking = prev === undefined || remaining <= prev * WORTH_A_ROUND; // the last round did
      if (shrinking && remaining > MIN_WORTH_A_ROUND && nextRemaining < remaining * WORTH_A_ROUND && f.round < o.maxRounds && f.totalBytes < o.maxBytes) {
        return {
          action: 'continue',
          estimateMs: est,
          reason:
            `${remaining} pages left fit the ${o.downtimeLimitMs} ms limit (estimate ${fmt(est)} ms), but one more round of about ` +
            `${fmt(sendMs)} ms should leave about ${Math.round(nextRemaining)}`,
        };
      }
      return {
        action: 'stop',
        forced: false,
        estimateMs: est,
        reason: `${remaining} pages left fit the ${o.downtimeLimitMs} ms downtime limit at ${f.mbps.toFixed(0)} MB/s (estimate ${fmt(est)} ms)`,
      };
    }
    if (o.deadlineMs !== undefined) {
      const left = o.deadlineMs - f.elapsedMs;
      // another round takes about as long as the last one; then the stop itself
      if (f.durationMs + est > left) {
        if (est <= left)
          return {
            action: 'stop',
            forced: true,
            estimateMs: est,
            reason: `deadline: ${fmt(left)} ms left, not enough for another round; stopping now (estimate ${fmt(est)} ms)`,
          };
        return {
          action: 'abort',
          code: 'ERR_LIVEMIG_DEADLINE',
          estimateMs: est,
          reason: `deadline: ${fmt(left)} ms left, stopping now would take about ${fmt(est)} ms`,
        };
      }
    }
    // Once throttling, step up every round while the guest still dirties more than half of
    // what we send (QEMU's auto-converge steps each iteration too): on a slow link a round is
    // long, and waiting for a stall to show again costs seconds per step.
    if (o.onStall === 'throttle' && this.throttle > 0 && this.throttle < THROTTLE_MAX && dirtyMbps > SLOW_SHARE * f.mbps) {
      // at least one step; further if the guest's unthrottled rate says one step cannot be
      // enough: the level at which it would dirty half of what we send, where stepping stops (a
      // guest writing 9x faster than a 1 Gbit/s link needs ~95%, eight steps away, each a round)
      const unthrottled = dirtyMbps / Math.max(0.01, 1 - this.throttle / 100);
      const aim = Math.ceil(100 * (1 - SLOW_SHARE * (f.mbps / unthrottled)));
      this.throttle = Math.min(THROTTLE_MAX, Math.max(this.throttle + THROTTLE_STEP, aim));
      this.#stallRounds = 0;
      return {
        action: 'throttle',
        level: this.throttle,
        estimateMs: est,
        reason:
          `still not converging: the guest dirties ${dirtyMbps.toFixed(0)} MB/s against ${f.mbps.toFixed(0)} MB/s sent; throttling it to ` +
          `${100 - this.throttle}% of its writes`,
      };
    }
    if (o.onStall === 'throttle' && this.throttle === 0 && this.#slowRounds >= STALL_ROUNDS && this.#stallRounds < STALL_ROUNDS) {
      this.throttle = THROTTLE_FIRST;
      this.#slowRounds = 0;
      return {
        action: 'throttle',
        level: this.throttle,
        estimateMs: est,
        reason:
          `converging too slowly: the guest dirtied ${dirtyMbps.toFixed(0)} MB/s against ${f.mbps.toFixed(0)} MB/s sent, more than ` +
          `${SLOW_SHARE * 100}% for ${STALL_ROUNDS} rounds (estimate ${fmt(est)} ms > ${o.downtimeLimitMs} ms); throttling the guest to ` +
          `${100 - this.throttle}% of its writes`,
      };
    }
    if (this.#stallRounds >= STALL_ROUNDS) {
      const why =
        `not converging: ${remaining} pages left after ${this.#stallRounds} rounds that did not shrink them by a tenth (estimate ` +
        `${fmt(est)} ms > ${o.downtimeLimitMs} ms)`;
      this.#stallRounds = 0;
      switch (o.onStall) {
        case 'throttle':
          // next to nothing left and still no fit: the limit is below what the stop itself costs,
          // which no throttle lowers (an idle guest was throttled round after round for 8 ms)
          if (remaining <= MIN_WORTH_A_ROUND && o.downtimeLimitMs <= o.fixedCostMs)
            return {
              action: 'stop',
              forced: true,
              estimateMs: est,
              reason: `${why}; the limit is below the stop's own cost (${o.fixedCostMs} ms), which no throttle lowers: stopping`,
            };
          if (this.throttle < THROTTLE_MAX) {
            this.throttle = this.throttle === 0 ? THROTTLE_FIRST : Math.min(THROTTLE_MAX, this.throttle + THROTTLE_STEP);
            this.#stallRounds = STALL_ROUNDS - 1; // one more round to see the effect, then step again
            return {
              action: 'throttle',
              level: this.throttle,
              estimateMs: est,
              reason: `${why}; throttling the guest to ${100 - this.throttle}% of its writes`,
            };
          }
          return { action: 'stop', forced: true, estimateMs: est, reason: `${why}; throttle at its maximum ${THROTTLE_MAX}%: stopping` };
        case 'force':
          return { action: 'stop', forced: true, estimateMs: est, reason: `${why}; stall policy force: stopping now` };
        case 'postcopy':
          return { action: 'postcopy', code: 'ERR_LIVEMIG_STALLED', estimateMs: est, reason: `${why}; stall policy postcopy` };
        case 'abort':
          return { action: 'abort', code: 'ERR_LIVEMIG_STALLED', estimateMs: est, reason: `${why}; stall policy abort: giving up, the guest stays here` };
      }
    }
    if (f.round >= o.maxRounds)
      return {
        action: 'stop',
        forced: true,
        estimateMs: est,
        reason: `round limit ${o.maxRounds} reached; stopping with ${remaining} pages left (estimate ${fmt(est)} ms)`,
      };
    if (f.totalBytes >= o.maxBytes)
      return {
        action: 'stop',
        forced: true,
        estimateMs: est,
        reason: `byte limit ${o.maxBytes} reached (${f.totalBytes} sent); stopping with ${remaining} pages left (estimate ${fmt(est)} ms)`,
      };
    return { action: 'continue', estimateMs: est, reason: `${remaining} pages left need about ${fmt(est)} ms, over the ${o.downtimeLimitMs} ms limit` };
  }
}
