/**
 * A migration's progress on the terminal: a bar redrawn in place on a TTY, plain lines
 * otherwise (a log or a pipe), at most one a second.
 */
const WIDTH = 30;

export interface ShownProgress {
  percent: number;
  eta_s?: number;
  transferred_bytes?: number;
  total_bytes?: number;
  stage?: string;
}

export class ProgressBar {
  readonly #out: NodeJS.WriteStream;
  readonly #tty: boolean;
  #lastLine = 0;
  #drawn = false;

  constructor(out: NodeJS.WriteStream = process.stderr) {
    this.#out = out;
    this.#tty = out.isTTY === true;
  }

  show(p: ShownProgress): void {
    const pct = Math.max(0, Math.min(100, p.percent));
    const text =
      `${pct.toFixed(1).padStart(5)}% ${mib(p.transferred_bytes)}/${mib(p.total_bytes)} MiB ` +
      `sent${p.eta_s !== undefined ? `, ETA ${p.eta_s.toFixed(1)} s` : ''}${p.stage ? ` (${p.stage})` : ''}`;
    if (this.#tty) {
      const full = Math.round((pct / 100) * WIDTH);
      this.#out.write(`\r[${'#'.repeat(full)}${'.'.repeat(WIDTH - full)}] ${text}\x1b[K`);
      this.#drawn = true;
      return;
    }
    const t = Date.now();
    if (t - this.#lastLine < 1000 && pct < 100) return;
    this.#lastLine = t;
    this.#out.write(`progress ${text}\n`);
  }

  /** A line of its own (a state change), below the bar. */
  line(text: string): void {
    if (this.#drawn) this.#out.write('\n');
    this.#drawn = false;
    this.#out.write(text + '\n');
  }

  end(): void {
    if (this.#drawn) this.#out.write('\n');
    this.#drawn = false;
  }
}

function mib(b: number | undefined): string {
  return b === undefined ? '?' : (b / 2 ** 20).toFixed(0);
}
