/**
 * A migration's progress as an operator sees it (the daemon's progress events and `livemig
 * send`'s line), computed from samples of where it is. All sizes are region bytes (pages x page
 * size) unless named wire bytes.
 *
 * The work of a live migration grows while it runs: the guest writes pages already sent. So the
 * percentage is the share of the work known so far that is done:
 *   percent = 100 x moved / (moved + remaining + reserve)
 * where `moved` is what went (resends included), `remaining` what is due now (the current
 * round's pages not yet sent and those held back, the stop's, or post-copy's pages not yet at
 * the destination) and `reserve` what the current round's end is expected to add: the pages the
 * guest wrote in this round so far, plus its dirtying rate over the rest of the round. A round
 * that ends with more dirty pages than the reserve foresaw would lower it; the percentage never
 * runs backwards, and while bytes move it still advances, by the share of the outstanding work
 * each sample's bytes covered (percent += (99.9 - percent) x step / (step + remaining +
 * reserve)). Only completion makes it 100.
 */
import { FIXED_STOP_COST_MS } from '../precopy/policy.js';
import type { DiskProgress, MigrationStatus } from '../source/types.js';

/** the highest percentage before completion: nothing left is not done, the stop is ahead */
const CEILING = 99.9;
/** throughput is measured over the samples of about this long */
const RATE_WINDOW_MS = 1000;
/** ... and not over less than this */
const MIN_RATE_WINDOW_MS = 200;
/** an ETA only while the guest's writes leave at least this share of the throughput for progress */
const MIN_NET_SHARE = 0.1;

export interface PostcopyProgress {
  pages_needed: number;
  pages_left: number;
  pages_pushed: number;
  pages_served: number;
  /** the destination's page faults answered (requests) */
  faults: number;
}

/** Where a migration is, at one moment. */
export interface ProgressSample {
  /** when, ms on the monotonic clock (performance.now()) */
  at: number;
  stage: string;
  /** region bytes sent so far, resends included */
  movedBytes: number;
  /** region bytes due now */
  remainingBytes: number;
  /** bytes on the wire so far (frames included, after encoding) */
  wireBytes: number;
  /** the source's own recent wire rate, MB/s: the throughput until the samples span enough time */
  bandwidthMbps?: number | undefined;
  /** pre-copy: region bytes the guest wrote in this round so far, and how fast it writes (bytes/s) */
  dirtyBytes?: number | undefined;
  dirtyBytesPerS?: number | undefined;
  expectedDowntimeMs?: number | undefined;
  postcopy?: PostcopyProgress | undefined;
  disks?: DiskProgress[] | undefined;
}

/** The progress event's fields (docs/API.md, "Progress"). */
export interface ProgressView {
  /** 0..100, two decimals, never backwards; 100 only at completion */
  percent: number;
  /** seconds to completion at the throughput and dirty rate now (undefined: not known, or the guest writes about as fast as pages go) */
  eta_s: number | undefined;
  /** ms since the daemon took the migration, on a monotonic clock: the sample's own time */
  elapsed_ms: number;
  remaining_bytes: number;
  total_bytes: number;
  /** region bytes sent so far (resends included), and bytes on the wire */
  transferred_bytes: number;
  wire_bytes: number;
  /** region bytes and wire bytes per second over the last second */
  throughput_bytes_per_s: number | undefined;
  wire_bytes_per_s: number | undefined;
  /** pre-copy: region bytes the guest wrote in this round so far and per second; the pause if it stopped now */
  dirty_bytes: number | undefined;
  dirty_bytes_per_s: number | undefined;
  expected_downtime_ms: number | undefined;
  postcopy?: PostcopyProgress;
  /** the guest's disks: each one's size and the 4 KiB blocks sent so far (resends included) */
  disks?: DiskProgress[];
}

/** A sample from what MigrationControl.status() answered. */
export function sampleFromStatus(s: MigrationStatus, at: number): ProgressSample {
  const ps = s.page_size;
  return {
    at,
    stage: s.stage,
    movedBytes: s.pages_sent * ps,
    remainingBytes: s.pages_remaining * ps,
    wireBytes: s.bytes_sent,
    bandwidthMbps: s.bandwidth_mbps,
    dirtyBytes: s.dirty_pages === undefined ? undefined : s.dirty_pages * ps,
    dirtyBytesPerS: s.dirty_pages_rate === undefined ? undefined : s.dirty_pages_rate * ps,
    expectedDowntimeMs: s.expected_downtime_ms,
    ...(s.postcopy ? { postcopy: s.postcopy } : {}),
    ...(s.disks ? { disks: s.disks } : {}),
  };
}

export class Progress {
  readonly #total: number;
  readonly #t0: number;
  #percent = 0;
  #moved = 0;
  #wire = 0;
  #window: { at: number; moved: number; wire: number }[] = [];
  #view: ProgressView;

  constructor(totalBytes: number, startedAt = performance.now()) {
    this.#total = totalBytes;
    this.#t0 = startedAt;
    this.#view = {
      percent: 0,
      eta_s: undefined,
      elapsed_ms: 0,
      remaining_bytes: totalBytes,
      total_bytes: totalBytes,
      transferred_bytes: 0,
      wire_bytes: 0,
      throughput_bytes_per_s: undefined,
      wire_bytes_per_s: undefined,
      dirty_bytes: undefined,
      dirty_bytes_per_s: undefined,
      expected_downtime_ms: undefined,
    };
  }

  update(s: ProgressSample): ProgressView {
    const total = this.#total;
    // counters never run backwards (a sample from an older reading is not a step back)
    const moved = Math.max(this.#moved, s.movedBytes);
    const wire = Math.max(this.#wire, s.wireBytes);
    const step = moved - this.#moved;
    [this.#moved, this.#wire] = [moved, wire];
    const remaining = Math.min(Math.max(0, s.remainingBytes), total);
    const rates = this.#rates(s, moved, wire);
    const precopy = s.stage === 'precopy';
    // what the round's end is expected to add: written so far, and at the dirtying rate until the round's pages are out
    const untilRoundEnd = rates.region !== undefined && rates.region > 0 ? remaining / rates.region : 0;
    const reserve = precopy ? Math.min(total, (s.dirtyBytes ?? 0) + (s.dirtyBytesPerS ?? 0) * untilRoundEnd) : 0;
    const left = remaining + reserve;
    const target = moved + left > 0 ? (100 * moved) / (moved + left) : 0;
    const advanced = step > 0 ? this.#percent + ((CEILING - this.#percent) * step) / (step + left) : this.#percent;
    this.#percent = Math.min(CEILING, Math.max(this.#percent, target, advanced));
    this.#view = {
      percent: floor2(this.#percent),
      eta_s: eta(left, rates.region, precopy ? s.dirtyBytesPerS : undefined),
      elapsed_ms: Math.max(this.#view.elapsed_ms, Math.round(s.at - this.#t0)),
      remaining_bytes: remaining,
      total_bytes: total,
      transferred_bytes: moved,
      wire_bytes: wire,
      throughput_bytes_per_s: round0(rates.region),
      wire_bytes_per_s: round0(rates.wire),
      dirty_bytes: precopy ? round0(s.dirtyBytes) : undefined,
      dirty_bytes_per_s: precopy ? round0(s.dirtyBytesPerS) : undefined,
      expected_downtime_ms: precopy ? s.expectedDowntimeMs : undefined,
      ...(s.postcopy ? { postcopy: s.postcopy } : {}),
      ...(s.disks ? { disks: s.disks } : {}),
    };
    return this.#view;
  }

  /** Region and wire bytes per second over the last second of samples; the source's own wire rate before that. */
  #rates(s: ProgressSample, moved: number, wire: number): { region: number | undefined; wire: number | undefined } {
    const w = this.#window;
    w.push({ at: s.at, moved, wire });
    while (w.length > 2 && s.at - w[1]!.at >= RATE_WINDOW_MS) w.shift();
    const first = w[0]!;
    const span = s.at - first.at;
    if (span >= MIN_RATE_WINDOW_MS) return { region: ((moved - first.moved) * 1000) / span, wire: ((wire - first.wire) * 1000) / span };
    if (s.bandwidthMbps === undefined) return { region: undefined, wire: undefined };
    const wireRate = s.bandwidthMbps * 1e6;
    // region bytes go faster than wire bytes by what the encodings spare
    return { region: wire > 0 ? (wireRate * moved) / wire : wireRate, wire: wireRate };
  }

  complete(): ProgressView {
    this.#percent = 100;
    const pc = this.#view.postcopy;
    this.#view = {
      ...this.#view,
      percent: 100,
      eta_s: 0,
      remaining_bytes: 0,
      dirty_bytes: undefined,
      dirty_bytes_per_s: undefined,
      expected_downtime_ms: undefined,
      ...(pc ? { postcopy: { ...pc, pages_left: 0 } } : {}),
    };
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

/**
 * What remains at the throughput now, less what the guest writes meanwhile (pre-copy: each
 * round resends what the last one left dirty, a geometric series), plus the stop.
 */
function eta(leftBytes: number, regionRate: number | undefined, dirtyRate: number | undefined): number | undefined {
  if (regionRate === undefined || regionRate <= 0) return undefined;
  const net = regionRate - (dirtyRate ?? 0);
  if (net < MIN_NET_SHARE * regionRate) return undefined;
  return +(leftBytes / net + FIXED_STOP_COST_MS / 1e3).toFixed(2);
}

function floor2(x: number): number {
  return Math.floor(x * 100) / 100;
}

function round0(x: number | undefined): number | undefined {
  return x === undefined ? undefined : Math.round(x);
}
