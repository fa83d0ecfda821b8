/**
 * The source's side of post-copy (mechanism: native/postcopy/). The guest is paused here and
 * runs at the destination. A native server thread answers page requests on the priority
 * connection; this module pushes every other page in the background, in order, but first
 * the neighbourhood of pages the guest just asked for (pre-paging, Hines & Gopalan: a fault
 * predicts faults nearby). Each page goes once: whoever claims it first (push or request).
 * If a connection breaks, pushing pauses until `reconnect` gives new ones; the destination
 * then says what it holds, and only the rest is sent.
 */
import type { PostcopyStats } from '../source/types.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import { LivemigError, type ErrorCode } from '../errors.js';
import { addon, call, type NativePostcopySource, type NativeWire, type PostcopyEvent } from '../native.js';
import type { Region } from '../region/region.js';

/** pages pushed after each fault, from the faulting page on */
const PREPAGE_PAGES = 64;
/** pages per push call (the push stream is read a chunk at a time between faults) */
const PUSH_CALL_PAGES = 1024;

/** The part of the migration's pacer (src/pacing/pacer.ts) the push uses. */
export interface PushPacer {
  /** pages for the next push call */
  pushPages(): number;
  /** takes `bytes`; resolves when the next push may go */
  pace(bytes: number): Promise<void>;
}

export interface Connections {
  /** the push stream's and the priority requests' connections, taken over from their FramedConnections */
  push: NativeWire;
  prio: NativeWire;
  /** what the destination holds (one byte per page), or undefined at the first attach */
  held?: Uint8Array;
  close(): void;
}

/** What a page server starts with. */
export interface PageServerOptions {
  region: Region;
  /** one byte per page: 1 if the destination must get it */
  needed: Uint8Array;
  /** the negotiated protocol version */
  version: number;
  /** the round its pages carry */
  round: number;
  batchPages: number;
  /**
   * if given, each page sent is hashed into it right after it went (the sending thread does
   * it: it slows the push by about a tenth, measured, so the sender hashes the paused region
   * once the destination has everything instead)
   */
  hashes?: BigUint64Array;
}

export class PageServer {
  readonly #native: NativePostcopySource;
  readonly #region: Region;
  readonly #listeners = new Set<(e: PostcopyEvent) => void>();
  #cursor = 0;
  #reconnects = 0;
  #bytes = 0;
  #conn: Connections | undefined;
  #generation = 0;
  #servedPaced = 0;
  readonly #batchPages: number;

  constructor(o: PageServerOptions) {
    const { region, needed, version, round, hashes } = o;
    this.#region = region;
    this.#batchPages = o.batchPages;
    const onEvent = (e: PostcopyEvent): void => {
      for (const l of this.#listeners) l(e);
    };
    this.#native = call(
      'ERR_LIVEMIG_SYSCALL',
      'postcopy',
      'creating the page server',
      () => new addon.PostcopySource({ region: region.nativeHandle, needed, version, round, ...(hashes ? { hashes } : {}), onEvent }),
    );
  }

  on(l: (e: PostcopyEvent) => void): () => void {
    this.#listeners.add(l);
    return () => this.#listeners.delete(l);
  }

  /** The pages the destination must get (one byte per page), when known only at the switch. */
  setNeeded(needed: Uint8Array): void {
    this.#native.reset(needed, 'needed');
  }

  attach(c: Connections): void {
    if (c.held) this.#native.reset(c.held, 'held');
    this.#native.attach(c.push, c.prio);
    this.#generation++;
    this.#conn?.close();
    this.#conn = c;
  }

  /**
   * Pushes every page still unsent, and resolves with the destination's digest once it says it
   * has them all. `reconnect` is called after a break, until it succeeds or throws. With a
   * pacer, each push call is sized and paced by it (pages served on request count too).
   */
  async run(reconnect: () => Promise<Connections>, onProgress?: (s: PostcopyStats) => void, pacer?: PushPacer): Promise<bigint> {
    let event: PostcopyEvent | undefined;
    let wake: (() => void) | undefined;
    const off = this.on((e) => {
      // a break of a connection already replaced says nothing about the current one
      if (e.type === 'disconnected' && e.generation !== this.#generation) return;
      event ??= e;
      if (e.type === 'complete') event = e; // completion wins over the close that follows it
      wake?.();
    });
    const waitEvent = (): Promise<void> => new Promise((r) => (wake = r));
    try {
      for (;;) {
        if (event?.type === 'complete') {
          // the destination holds every page: the last figures (a page served on request may
          // have gone after the last push call reported)
          onProgress?.(this.stats());
          return event.digest!;
        }
        if (event?.type === 'error')
          throw new LivemigError((event.code as ErrorCode | undefined) ?? 'ERR_LIVEMIG_PROTOCOL', `post-copy page server: ${event.message ?? 'failed'}`, {
            phase: 'postcopy',
          });
        if (event?.type === 'disconnected') {
          // a break heard while we reconnected may be of the connections just replaced
          const stale = event.generation !== undefined && event.generation !== this.#generation;
          const reason = event.message ?? '';
          event = undefined;
          if (stale) continue;
          trace('source', SourceEvent.postcopyLinkBroke, { reason });
          this.#native.detach();
          this.attach(await reconnect());
          this.#reconnects++;
          this.#cursor = 0;
          continue;
        }
        const next = this.#nextPages(Math.max(1, Math.min(PUSH_CALL_PAGES, pacer?.pushPages() ?? PUSH_CALL_PAGES)));
        if (next.length === 0) {
          await waitEvent(); // everything went: the destination's COMPLETE (or a break) is next
          continue;
        }
        try {
          const r = await this.#native.push(next, this.#batchPages);
          this.#bytes += r.bytes;
          // pages served on request go at once, but count against the cap: the push waits for them
          const served = this.#native.stats().servedBytes;
          await pacer?.pace(r.bytes + served - this.#servedPaced);
          this.#servedPaced = served;
        } catch (e) {
          // the push connection broke; the server thread sees it too (or already has)
          this.#native.detach();
          event ??= { type: 'disconnected', message: (e as Error).message, generation: this.#generation };
        }
        onProgress?.(this.stats());
      }
    } finally {
      off();
    }
  }

  /** The next pages to push: near recent faults first, then onward from the cursor. */
  #nextPages(max: number): Uint32Array {
    const pages = this.#region.pageCount;
    const recent = this.#native.recent();
    if (recent.length > 0) {
      const want = new Set<number>();
      for (const r of recent.slice(-8)) for (let p = r; p < Math.min(pages, r + PREPAGE_PAGES); p++) want.add(p);
      return Uint32Array.from([...want].sort((a, b) => a - b));
    }
    if (this.#cursor >= pages) {
      // a full pass is done; pages left unsent (a break lost them) go now
      const rest = this.#native.unsent();
      return rest.subarray(0, max);
    }
    const from = this.#cursor;
    this.#cursor = Math.min(pages, from + max);
    return Uint32Array.from({ length: this.#cursor - from }, (_, k) => from + k);
  }

  stats(): PostcopyStats {
    const s = this.#native.stats();
    return {
      pages_pushed: s.pushed,
      pages_served: s.served,
      pages_resent: s.resent,
      requests: s.requests,
      bytes: this.#bytes + s.servedBytes,
      reconnects: this.#reconnects,
    };
  }

  close(): void {
    this.#native.detach();
    this.#conn?.close();
    this.#conn = undefined;
  }
}
