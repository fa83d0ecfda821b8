/**
 * Where a running migration is between its events (MigrationControl.status()): the pages still
 * due, counted as each run of a send goes (a first pass over gigabytes is one round, and would
 * otherwise be one step), and the guest's dirtying during the round, counted without re-arming
 * where the tracker can (peekWritten), so that throughput, dirty rate and expected downtime
 * move with every sample rather than once per round. Post-copy: the pages not yet at the
 * destination, from the page server's counters.
 */
import { LivemigError } from '../errors.js';
import { FIXED_STOP_COST_MS } from '../precopy/policy.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import type { Pacer } from '../pacing/pacer.js';
import type { DiskProgress, MigrationStatus, PostcopyStats } from './types.js';

/** a count of written pages is taken at most this often: each one is a walk of the page tables */
const PEEK_INTERVAL_MS = 200;
/** a dirtying rate measured over less than this says little */
const MIN_RATE_WINDOW_MS = 50;

/** What the live status reads of the migration (SourceContext gives it). */
export interface LiveSource {
  stage(): string;
  round(): number;
  pageSize: number;
  pageCount: number;
  /** bytes and pages of completed sends */
  sent(): { bytes: number; pages: number };
  /** of the send under way, so far */
  inFlight(): { bytes: number; pages: number };
  /** the pages due in the current round and how many went since they were listed */
  pending(): { listed: number; sentSince: number };
  pacer: Pick<Pacer, 'achievedMbps' | 'estimateMbps'>;
  /** the tracker's count of pages written since it re-armed, when it has one */
  peekWritten: (() => Promise<number | undefined>) | undefined;
  /** with disks: each one's blocks sent so far */
  disks?: () => DiskProgress[];
}

export class LiveStatus {
  readonly #src: LiveSource;
  /** when the tracker last re-armed (its start, or a round's collect): the window a count covers */
  #dirtySince: number | undefined;
  /** the last round's dirtying rate, pages/s */
  #lastRate: number | undefined;
  #count: { pages: number; at: number } | undefined;
  #peekStarted = Number.NEGATIVE_INFINITY;
  #peeking = false;
  #peekFailed = false;
  /** pages held back for the stop (writable working set): due, though in no round's list */
  held = 0;
  #postcopy: { stats: () => PostcopyStats; pagesNeeded: number } | undefined;

  constructor(src: LiveSource) {
    this.#src = src;
  }

  /** The tracker re-armed now (it started, or collected a round); `dirtied`: the pages that collect returned. */
  rearmed(dirtied?: number): void {
    const t = performance.now();
    if (dirtied !== undefined && this.#dirtySince !== undefined && t - this.#dirtySince >= MIN_RATE_WINDOW_MS)
      this.#lastRate = (dirtied * 1000) / (t - this.#dirtySince);
    this.#dirtySince = t;
    this.#count = undefined;
  }

  /** The guest runs at the destination: from now on what remains is what the page server has not sent. */
  postcopy(p: { stats: () => PostcopyStats; pagesNeeded: number }): void {
    this.#postcopy = p;
  }

  status(): MigrationStatus {
    const src = this.#src;
    const t = performance.now();
    const done = src.sent();
    const flight = src.inFlight();
    const common = {
      stage: src.stage(),
      round: src.round(),
      pages_total: src.pageCount,
      page_size: src.pageSize,
      bandwidth_mbps: src.pacer.achievedMbps(),
      ...(src.disks ? { disks: src.disks() } : {}),
    };
    const pc = this.#postcopy;
    if (pc) {
      const s = pc.stats();
      // a page requested after its push went again: it counts once
      const arrived = s.pages_pushed + s.pages_served - s.pages_resent;
      const left = Math.max(0, pc.pagesNeeded - arrived);
      return {
        ...common,
        bytes_sent: done.bytes + s.bytes,
        pages_sent: done.pages + s.pages_pushed + s.pages_served,
        pages_remaining: left,
        dirty_pages: 0,
        dirty_pages_rate: undefined,
        expected_downtime_ms: undefined,
        postcopy: { pages_needed: pc.pagesNeeded, pages_left: left, pages_pushed: s.pages_pushed, pages_served: s.pages_served, faults: s.requests },
      };
    }
    const pagesSent = done.pages + flight.pages;
    const bytesSent = done.bytes + flight.bytes;
    const p = src.pending();
    const remaining = Math.max(0, p.listed - p.sentSince - flight.pages) + this.held;
    if (common.stage !== 'precopy')
      return {
        ...common,
        bytes_sent: bytesSent,
        pages_sent: pagesSent,
        pages_remaining: remaining,
        dirty_pages: 0,
        dirty_pages_rate: undefined,
        expected_downtime_ms: undefined,
      };
    this.#peek(t);
    const { dirty, rate } = this.#dirtying(t);
    const mbps = src.pacer.estimateMbps();
    const perPage = pagesSent > 0 ? bytesSent / pagesSent : src.pageSize;
    // if it stopped now: what is due and what the guest wrote meanwhile (a page both counts twice: an upper bound)
    const expected = dirty !== undefined && mbps !== undefined ? ((remaining + dirty) * perPage) / 1e3 / Math.max(mbps, 1) + FIXED_STOP_COST_MS : undefined;
    return {
      ...common,
      bytes_sent: bytesSent,
      pages_sent: pagesSent,
      pages_remaining: remaining,
      dirty_pages: dirty,
      dirty_pages_rate: rate === undefined ? undefined : Math.round(rate),
      expected_downtime_ms: expected === undefined ? undefined : +expected.toFixed(3),
    };
  }

  /** Pages written in this round so far and the rate now: counted, or from the last round's rate. */
  #dirtying(t: number): { dirty: number | undefined; rate: number | undefined } {
    const since = this.#dirtySince;
    if (since === undefined) return { dirty: undefined, rate: undefined };
    const c = this.#count;
    if (c && c.at - since >= MIN_RATE_WINDOW_MS) {
      const rate = (c.pages * 1000) / (c.at - since);
      return { dirty: Math.min(this.#src.pageCount, Math.round(c.pages + (rate * (t - c.at)) / 1000)), rate };
    }
    if (this.#lastRate === undefined) return { dirty: c?.pages, rate: undefined };
    return { dirty: Math.min(this.#src.pageCount, Math.round(Math.max(c?.pages ?? 0, (this.#lastRate * (t - since)) / 1000))), rate: this.#lastRate };
  }

  /** Starts a count of the written pages (one at a time, PEEK_INTERVAL_MS apart); its answer serves the next samples. */
  #peek(t: number): void {
    const peekWritten = this.#src.peekWritten;
    if (!peekWritten || this.#peeking || this.#peekFailed || t - this.#peekStarted < PEEK_INTERVAL_MS) return;
    const since = this.#dirtySince;
    this.#peeking = true;
    this.#peekStarted = t;
    void peekWritten()
      .then((pages) => {
        // a count that began before the tracker re-armed mixes two rounds' writes
        if (pages !== undefined && since !== undefined && since === this.#dirtySince) this.#count = { pages, at: performance.now() };
      })
      .catch((e: unknown) => {
        // the migration goes on without the count (its rounds' collects say what they say);
        // the trace tells why the dirty rate falls back to the last round's
        this.#peekFailed = true;
        trace('source', SourceEvent.dirtyCountFailed, { code: e instanceof LivemigError ? e.code : 'ERR_LIVEMIG_TRACKING', reason: (e as Error).message });
      })
      .finally(() => (this.#peeking = false));
  }
}
