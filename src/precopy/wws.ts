/**
 * Writable working set (Clark et al., "Live Migration of Virtual Machines", NSDI 2005): pages
 * the guest rewrites round after round. Sending them each round is wasted: they are dirty
 * again before the round ends. The history keeps, per page, one bit per recent round (bit 0:
 * dirtied in the last round); a page dirtied in each of the last HOT_ROUNDS rounds is hot and
 * held back for stop-and-copy; a held page that was not dirtied in the last round has cooled
 * down and is sent again.
 */
const HOT_ROUNDS = 2;
const HOT_MASK = (1 << HOT_ROUNDS) - 1;

export class WritableWorkingSet {
  readonly #history: Uint8Array;
  /** pages currently held back */
  #held = new Set<number>();

  constructor(pageCount: number) {
    this.#history = new Uint8Array(pageCount);
  }

  /** The pages found dirty at the end of a round. */
  record(dirty: Uint32Array): void {
    const h = this.#history;
    for (let i = 0; i < h.length; i++) h[i] = (h[i]! << 1) & 0xff;
    for (const p of dirty) h[p] = h[p]! | 1;
  }

  /** Whether page p was dirtied in each of the last HOT_ROUNDS rounds. */
  isHot(p: number): boolean {
    return (this.#history[p]! & HOT_MASK) === HOT_MASK;
  }

  /**
   * Splits the pages due for the next round: hot ones are held back, the rest are sent, and
   * held pages that cooled down (not dirtied last round) are sent again. Returns what to send.
   */
  plan(dirty: Uint32Array): { send: Uint32Array; held: number } {
    const send: number[] = [];
    const held = new Set<number>();
    for (const p of dirty) {
      if (this.isHot(p)) held.add(p);
      else send.push(p);
    }
    for (const p of this.#held) {
      // still dirty: it is in `dirty` and was handled above; cooled: the copy there is stale
      if (!held.has(p) && !(this.#history[p]! & 1)) send.push(p);
    }
    this.#held = held;
    send.sort((a, b) => a - b);
    return { send: Uint32Array.from(send), held: held.size };
  }

  /** Pages held back now: they go at stop-and-copy. */
  heldPages(): Uint32Array {
    return Uint32Array.from([...this.#held].sort((a, b) => a - b));
  }

  get heldCount(): number {
    return this.#held.size;
  }
}
