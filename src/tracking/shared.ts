/**
 * A same-host upgrade's tracker: the destination maps the very memory the guest writes (its
 * memfds passed over a unix socket), so no page is ever out of date there and none is sent.
 */
import { TrackerState } from './state.js';
import type { DirtyTracker } from './types.js';

export class SharedMemoryTracker implements DirtyTracker {
  readonly backend = 'shared' as const;
  readonly pageCount: number;
  readonly #state = new TrackerState('shared');
  readonly #none = new Uint32Array(0);

  constructor(pageCount: number) {
    this.pageCount = pageCount;
  }
  async start(): Promise<void> {
    this.#state.beginStart();
    this.#state.started();
  }
  collect(): Promise<Uint32Array> {
    return this.#state.collecting(async () => this.#none);
  }
  collectFinal(): Uint32Array {
    return this.#none;
  }
  async stop(): Promise<void> {
    if (!this.#state.beginStop()) return;
    await this.#state.quiesce();
  }
}
