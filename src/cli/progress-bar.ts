/**
 * A migration's progress on the terminal: on a TTY one line redrawn in place (carriage return,
 * clear to the end of the line, cut to the terminal's width so that it never wraps), with the
 * lines of state changes and rounds printed above it; otherwise (a log or a pipe) one plain line
 * per sample, without escape codes.
 */
const WIDTH = 20;
const MiB = 2 ** 20;
/** a TTY is redrawn at most this often (a burst of samples is one redraw) */
const REDRAW_MS = 100;

/** The progress event's fields the bar shows (src/daemon/progress.ts, ProgressView). */
export interface ShownProgress {
  percent: number;
  eta_s?: number | undefined;
  remaining_bytes?: number;
  total_bytes?: number;
  transferred_bytes?: number;
  wire_bytes?: number;
  throughput_bytes_per_s?: number | undefined;
  dirty_bytes_per_s?: number | undefined;
  expected_downtime_ms?: number | undefined;
  postcopy?: { pages_left: number; pages_pushed: number; pages_served: number; faults: number };
  stage?: string;
}

/**
 * One sample as text, the most telling first (a terminal's line is cut at its width): percent,
 * region bytes left of the whole, post-copy's pages, the ETA, the rates and expected pause, then
 * what went (and on the wire) and the stage.
 */
export function progressText(p: ShownProgress): string {
  const pct = Math.max(0, Math.min(100, p.percent));
  const parts = [`${pct.toFixed(1).padStart(5)}%`];
  if (p.remaining_bytes !== undefined && p.total_bytes !== undefined) parts.push(`${mib(p.remaining_bytes)} of ${mib(p.total_bytes)} MiB left`);
  if (p.postcopy) parts.push(`${p.postcopy.pages_left} pages left, ${p.postcopy.pages_pushed} pushed, ${p.postcopy.faults} faults served`);
  if (p.eta_s !== undefined) parts.push(`ETA ${p.eta_s.toFixed(1)} s`);
  if (p.throughput_bytes_per_s !== undefined) parts.push(`${mbs(p.throughput_bytes_per_s)} MB/s`);
  if (p.dirty_bytes_per_s !== undefined) parts.push(`dirty ${mbs(p.dirty_bytes_per_s)} MB/s`);
  if (p.expected_downtime_ms !== undefined) parts.push(`downtime ~${p.expected_downtime_ms.toFixed(0)} ms`);
  if (p.transferred_bytes !== undefined)
    parts.push(`${mib(p.transferred_bytes)} MiB sent${p.wire_bytes !== undefined ? ` (${mib(p.wire_bytes)} MiB on the wire)` : ''}`);
  return parts.join(', ') + (p.stage ? ` (${p.stage})` : '');
}

export class ProgressBar {
  readonly #out: NodeJS.WriteStream;
  readonly #tty: boolean;
  /** the bar as last drawn (a TTY redraws it below a line printed above it) */
  #bar = '';
  #drawn = false;
  #drawnAt = Number.NEGATIVE_INFINITY;
  readonly #redrawMs: number;

  /** `redrawMs`: the least time between two redraws on a TTY (default REDRAW_MS) */
  constructor(out: NodeJS.WriteStream = process.stderr, o: { redrawMs?: number } = {}) {
    this.#out = out;
    this.#tty = out.isTTY === true;
    this.#redrawMs = o.redrawMs ?? REDRAW_MS;
  }

  show(p: ShownProgress): void {
    const text = progressText(p);
    if (!this.#tty) {
      this.#out.write(`progress ${text}\n`);
      return;
    }
    const pct = Math.max(0, Math.min(100, p.percent));
    const full = Math.round((pct / 100) * WIDTH);
    const bar = `[${'#'.repeat(full)}${'.'.repeat(WIDTH - full)}] ${text}`;
    const t = performance.now();
    if (bar === this.#bar && this.#drawn) return;
    this.#bar = bar;
    if (t - this.#drawnAt < this.#redrawMs && pct < 100) return;
    this.#draw(t);
  }

  #draw(t: number): void {
    // one column short of the width: a line that fills it wraps on some terminals
    const columns = this.#out.columns;
    const line = columns !== undefined && columns > 1 ? this.#bar.slice(0, columns - 1) : this.#bar;
    this.#out.write(`\r${line}\x1b[K`);
    this.#drawn = true;
    this.#drawnAt = t;
  }

  /** A line of its own (a state change, a round), above the bar. */
  line(text: string): void {
    if (this.#tty && this.#drawn) {
      this.#out.write(`\r\x1b[K${text}\n`);
      this.#draw(performance.now());
      return;
    }
    this.#out.write(text + '\n');
  }

  end(): void {
    if (this.#tty && this.#bar !== '') {
      this.#draw(performance.now()); // the last sample, even if it came within REDRAW_MS
      this.#out.write('\n');
    }
    this.#drawn = false;
    this.#bar = '';
  }
}

function mib(b: number): string {
  return (b / MiB).toFixed(0);
}

function mbs(bytesPerS: number): string {
  return (bytesPerS / 1e6).toFixed(1);
}
