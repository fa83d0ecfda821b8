/**
 * Writable working set (Clark et al., "Live Migration of Virtual Machines", NSDI 2005): pages
 * the guest rewrites round after round. Sending them each round is wasted: they are dirty
 * again before the round ends. Per page, the last round it was dirtied in and how many rounds
 * in a row that ran (a round's work is its dirty pages, not the region: a 16 GiB guest's 4M
 * pages are not visited every round); a page dirtied in each of the last HOT_ROUNDS rounds is
 * hot and held back for stop-and-copy; a held page that was not dirtied in the last round has
 * cooled down and is sent again.
 */
const HOT_ROUNDS = 2;

export class WritableWorkingSet {
  /** the round each page was last dirtied in (0: never), and the rounds in a row up to it */
  readonly #lastDirty: Uint32Array;
  readonly #streak: Uint8Array;
  #round = 0;
  /** pages currently held back */
  #held = new Set<number>();

  constructor(pageCount: number) {
    this.#lastDirty = new Uint32Array(pageCount);
    this.#streak = new Uint8Array(pageCount);
  }

  /** The pages found dirty at the end of a round. */
  record(dirty: Uint32Array): void {
    const r = ++this.#round;
    for (const p of dirty) {
      this.#streak[p] = this.#lastDirty[p] === r - 1 ? Math.min(this.#streak[p]! + 1, 255) : 1;
      this.#lastDirty[p] = r;
    }
  }

  #dirtiedLastRound(p: number): boolean {
    return this.#round > 0 && this.#lastDirty[p] === this.#round;
  }

  /** Whether page p was dirtied in each of the last HOT_ROUNDS rounds. */
  isHot(p: number): boolean {
    return this.#dirtiedLastRound(p) && this.#streak[p]! >= HOT_ROUNDS;
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
      if (!held.has(p) && !this.#dirtiedLastRound(p)) send.push(p);
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
