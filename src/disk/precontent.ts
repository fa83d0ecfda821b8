/**
 * Disk post-copy at the destination, transparent to the VMM (issue 33, item 6): the image is
 * watched with fanotify pre-content events (native/disk/precontent.cc), so an access to a block
 * not yet here waits while the block is fetched and written, then goes on; blocks pushed in the
 * background fill the rest; the watch goes once every block is here.
 *
 * Each block is missing, being filled, or here. A fill (fetched for an access, or pushed) is
 * written through a descriptor the kernel opened without notification, and an access to a block
 * being filled waits for that fill: a guest write to a block that arrived is never overwritten
 * by a push of the older content, since a push writes only a missing block.
 */
import { closeSync, openSync, read } from 'node:fs';
import { LivemigError } from '../errors.js';
import { addon, call, callAsync, type PrecontentEvent } from '../native.js';

export interface PrecontentOptions {
  /** the destination image, already holding every block that is here (the rest read as anything) */
  path: string;
  size: number;
  blockSize: number;
  /** one byte per block, 1: already here */
  present: Uint8Array;
  /** the content of blocks [first, first + count) from the source */
  fetch(first: number, count: number): Promise<Buffer>;
  /** an access could not be served (its fetch failed): it fails with EIO */
  onError?(e: unknown): void;
}

const MISSING = 0;
const HERE = 1;
const POLL_MS = 100;

export class PrecontentImage {
  readonly #o: PrecontentOptions;
  readonly #state: Uint8Array;
  readonly #filling = new Map<number, Promise<void>>();
  #fan: number;
  /** a descriptor of the image that raises no event (the first event's), for pushed blocks */
  #quiet: number | undefined;
  #left: number;
  #running: Promise<void>;
  #stopped = false;
  readonly fetched = { accesses: 0, blocks: 0 };

  private constructor(o: PrecontentOptions, fan: number) {
    this.#o = o;
    this.#fan = fan;
    this.#state = Uint8Array.from(o.present, (p) => (p ? HERE : MISSING));
    this.#left = this.#state.reduce((n, s) => n + (s === HERE ? 0 : 1), 0);
    this.#running = this.#loop();
    this.#running.catch((e: unknown) => this.#o.onError?.(e));
  }

  /** Watches the image; resolves once a descriptor for pushes is held. */
  static async start(o: PrecontentOptions): Promise<PrecontentImage> {
    const blocks = Math.ceil(o.size / o.blockSize);
    if (o.present.length !== blocks)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `present must have a byte per block (${blocks})`, { phase: 'disk' });
    const fan = call('ERR_LIVEMIG_UNSUPPORTED', 'disk', `watching ${o.path} for pre-content access (fanotify, Linux >= 6.14)`, () =>
      addon.precontentWatch(o.path),
    );
    const img = new PrecontentImage(o, fan);
    // one access of our own: its event's descriptor raises no event, so pushes do not wait on us
    const fd = openSync(o.path, 'r');
    try {
      await new Promise<void>((resolve, reject) => read(fd, Buffer.alloc(1), 0, 1, 0, (e) => (e ? reject(e) : resolve())));
    } finally {
      closeSync(fd);
    }
    return img;
  }

  /** Blocks not here yet. */
  get missing(): number {
    return this.#left;
  }

  /** A block pushed from the source: written unless it is here or being filled already. */
  async push(block: number, data: Buffer): Promise<void> {
    if (this.#state[block] !== MISSING || this.#filling.has(block)) return;
    await this.#fill(block, 1, async () => data);
  }

  /** Stops watching (an access still waiting goes on); the image stays as it is. */
  async stop(): Promise<void> {
    this.#stopped = true;
    await this.#running;
  }

  /** Serves accesses until stopped or complete; then the watch goes (the kernel lets queued accesses on). */
  async #loop(): Promise<void> {
    try {
      while (!this.#stopped && !(this.#left === 0 && this.#filling.size === 0)) {
        const events = await callAsync('ERR_LIVEMIG_SYSCALL', 'disk', 'reading pre-content events', () => addon.precontentNextAsync(this.#fan, POLL_MS));
        await Promise.all(events.map((e) => this.#serve(e)));
      }
    } finally {
      addon.precontentUnwatch(this.#fan);
      if (this.#quiet !== undefined) closeSync(this.#quiet);
      this.#quiet = undefined;
    }
  }

  async #serve(e: PrecontentEvent): Promise<void> {
    let allow = true;
    try {
      if (this.#quiet === undefined) this.#quiet = call('ERR_LIVEMIG_SYSCALL', 'disk', 'keeping a quiet descriptor', () => addon.unixDup(e.fd));
      if (e.offset >= 0 && e.count > 0) {
        const bs = this.#o.blockSize;
        const first = Math.floor(e.offset / bs);
        const end = Math.min(Math.ceil((e.offset + e.count) / bs), this.#state.length);
        const waits: Promise<void>[] = [];
        let runStart = -1;
        const flush = (upTo: number): void => {
          if (runStart < 0) return;
          const from = runStart;
          waits.push(this.#fill(from, upTo - from, () => this.#o.fetch(from, upTo - from), true));
          runStart = -1;
        };
        for (let b = first; b < end; b++) {
          const pending = this.#filling.get(b);
          if (pending) waits.push(pending);
          if (this.#state[b] === MISSING && !pending) {
            if (runStart < 0) runStart = b;
          } else flush(b);
        }
        flush(end);
        await Promise.all(waits);
      }
    } catch (err) {
      allow = false;
      this.#o.onError?.(err);
    } finally {
      addon.precontentRespond(this.#fan, e.fd, allow);
    }
  }

  /** Blocks [first, first+count): fetched, written quietly, then here; accesses meanwhile wait on it. */
  #fill(first: number, count: number, content: () => Promise<Buffer>, forAccess = false): Promise<void> {
    const bs = this.#o.blockSize;
    const job = (async () => {
      const data = await content();
      if (data.length !== count * bs)
        throw new LivemigError('ERR_LIVEMIG_PROTOCOL', `blocks ${first}+${count}: ${data.length} bytes fetched`, { phase: 'disk' });
      const fd = this.#quiet;
      if (fd === undefined) throw new LivemigError('ERR_LIVEMIG_STATE', 'internal: no quiet descriptor for a fill', { phase: 'disk' });
      await callAsync('ERR_LIVEMIG_SYSCALL', 'disk', `writing blocks ${first}+${count}`, () => addon.precontentFillAsync(fd, first * bs, data));
      for (let b = first; b < first + count; b++) {
        if (this.#state[b] === HERE) continue;
        this.#state[b] = HERE;
        this.#left--;
      }
      if (forAccess) {
        this.fetched.accesses++;
        this.fetched.blocks += count;
      }
    })();
    for (let b = first; b < first + count; b++) this.#filling.set(b, job);
    const done = job.finally(() => {
      for (let b = first; b < first + count; b++) if (this.#filling.get(b) === job) this.#filling.delete(b);
    });
    done.catch(() => undefined);
    return done;
  }
}
