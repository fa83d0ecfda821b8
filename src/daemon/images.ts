/**
 * Images of guests this daemon sent away, kept so that a guest coming back moves only what
 * changed while it was gone (the receiver's reuse image: its pages are loaded first and the
 * source skips every page whose hash matches). A kept image is the released guest's own memory
 * file, held open: it costs its memory on this host until it is used, replaced or evicted, so
 * they are kept only within a byte budget (`livemig serve --keep-images`), the oldest evicted
 * first. A guest of several memory files, or with its memory at an offset, is not kept (the
 * reuse image is one file of exactly the region's size).
 */
import { closeSync, fstatSync, openSync } from 'node:fs';
import { trace } from '../trace.js';
import { DaemonEvent } from '../trace-events.js';

interface Kept {
  fd: number;
  bytes: number;
}

export class KeptImages {
  readonly #images = new Map<string, Kept>();
  #bytes = 0;

  constructor(readonly budgetBytes: number) {}

  /** Bytes held now. */
  get bytes(): number {
    return this.#bytes;
  }

  /** Keeps `name`'s memory file (before the guest's release frees it), when it fits the budget. */
  keep(name: string, pieces: readonly { fd: number; offset: number; size: number }[], bytes: number): boolean {
    this.drop(name);
    const [one] = pieces;
    if (pieces.length !== 1 || !one || one.offset !== 0 || one.size !== bytes || bytes > this.budgetBytes) return false;
    let fd: number;
    try {
      // a new open of the very memfd (not a copy): its pages stay while this is open
      fd = openSync(`/proc/self/fd/${one.fd}`, 'r');
      if (fstatSync(fd).size !== bytes) {
        closeSync(fd);
        return false;
      }
    } catch (e) {
      trace('daemon', DaemonEvent.imageNotKept, { guest: name, reason: (e as Error).message });
      return false;
    }
    while (this.#bytes + bytes > this.budgetBytes && this.#images.size > 0) this.drop(this.#images.keys().next().value!);
    this.#images.set(name, { fd, bytes });
    this.#bytes += bytes;
    return true;
  }

  /**
   * The image of `name` for a migration bringing it back (a path this process can open), or
   * undefined. It is handed over once: the caller releases it with the returned function when
   * the receiver has loaded it (or the migration ended).
   */
  take(name: string | undefined, bytes: number): { path: string; release(): void } | undefined {
    const kept = name === undefined ? undefined : this.#images.get(name);
    if (!kept || kept.bytes !== bytes) return undefined;
    this.#images.delete(name!);
    this.#bytes -= kept.bytes;
    let open = true;
    return {
      path: `/proc/self/fd/${kept.fd}`,
      release: () => {
        if (open) closeSync(kept.fd);
        open = false;
      },
    };
  }

  drop(name: string): void {
    const kept = this.#images.get(name);
    if (!kept) return;
    closeSync(kept.fd);
    this.#images.delete(name);
    this.#bytes -= kept.bytes;
  }

  close(): void {
    for (const name of [...this.#images.keys()]) this.drop(name);
  }
}
