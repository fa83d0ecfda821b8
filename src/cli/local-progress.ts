/**
 * `livemig send`'s progress on stderr, the same figures as the daemon's progress events: the
 * migration's status read every PROGRESS_INTERVAL_MS into the same progress model, shown by
 * the same bar (in place on a terminal, a line per sample otherwise), with the handshake and
 * each round as lines of their own.
 */
import { PROGRESS_INTERVAL_MS } from '../daemon/migration.js';
import { Progress, sampleFromStatus } from '../daemon/progress.js';
import type { MigrationControl, ProgressEvent } from '../source/types.js';
import { progressLine } from './migration-flags.js';
import { ProgressBar } from './progress-bar.js';

export class LocalProgress {
  readonly #control: MigrationControl;
  readonly #progress: Progress;
  readonly #bar: ProgressBar;
  readonly #timer: NodeJS.Timeout;

  constructor(o: { control: MigrationControl; totalBytes: number; out?: NodeJS.WriteStream }) {
    this.#control = o.control;
    this.#progress = new Progress(o.totalBytes);
    this.#bar = new ProgressBar(o.out ?? process.stderr);
    this.#timer = setInterval(() => this.#sample(), PROGRESS_INTERVAL_MS);
    this.#timer.unref();
  }

  /** The migration's onProgress: its events as lines, and a sample at each. */
  readonly onProgress = (e: ProgressEvent): void => {
    const line = progressLine(e);
    if (line !== undefined) this.#bar.line(line);
    this.#sample();
  };

  #sample(): void {
    const s = this.#control.status();
    if (!s) return;
    this.#bar.show({ ...this.#progress.update(sampleFromStatus(s, performance.now())), stage: s.stage });
  }

  /** The migration ended: the bar shows 100% when it completed, and the line ends. */
  end(o: { completed: boolean }): void {
    clearInterval(this.#timer);
    if (o.completed) this.#bar.show({ ...this.#progress.complete(), stage: 'done' });
    this.#bar.end();
  }
}
