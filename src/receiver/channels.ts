/**
 * The destination's extra channels (CAP_CHANNELS): each joins the migration's session with
 * ATTACH and gets a reader of its own, which applies the pages of its stripes natively as they
 * arrive (the sink refuses any other page, and any dup naming one). The ordering rule is in
 * src/source/channels.ts: a page always comes on the same channel, so readers never touch the
 * same page. What this keeps is how far each channel got: the main connection acknowledges a
 * round only once every channel has passed that round's ROUND_END, and the digest is computed
 * only once every channel has ended (ROUND_END {last}).
 */
import { LivemigError } from '../errors.js';
import { threadPoolSize } from '../native.js';
import { FrameType, MAX_CHANNELS } from '../protocol/format.js';
import { ProtocolError } from '../protocol/errors.js';
import { decodeRoundEnd, encodeAttached } from '../protocol/messages.js';
import { sourceAborted } from './failures.js';
import type { FramedConnection } from '../protocol/connection.js';
import type { PageSink } from '../protocol/wire.js';
import type { PostcopySession } from './session.js';

/** pool threads a receiver keeps besides its channels' reads */
const POOL_RESERVE = 1;

/**
 * The most channels this receiver grants: `asked` (a receiver's option), never more than
 * libuv's pool can read at once (each channel's read holds a pool thread while it waits).
 */
export function maxChannels(asked: number | undefined): number {
  const room = Math.max(1, threadPoolSize() - POOL_RESERVE);
  return Math.max(1, Math.min(asked ?? MAX_CHANNELS, room, MAX_CHANNELS));
}

/** How a channel joins: the time it has, what is set on it, the version its answer speaks. */
export interface Join {
  joinMs: number;
  prepare: (conn: FramedConnection) => void;
  version: number;
}

/** What IncomingChannels starts with. */
export interface IncomingChannelsOptions {
  /** channels granted, the main connection (channel 0) included */
  count: number;
  /** the migration's session, which channels 1..count-1 join */
  session: PostcopySession | undefined;
  /** where their pages go (each channel's reader takes only its own stripes) */
  sink: PageSink;
  join: Join;
  /** hears the first failure of any channel (the migration then ends: its main connection is aborted with it) */
  onFailure: (e: LivemigError) => void;
}

export class IncomingChannels {
  readonly count: number;
  /** pages the extra channels applied */
  pages = 0;
  readonly #reached: number[];
  readonly #ended: boolean[];
  readonly #conns: FramedConnection[] = [];
  readonly #waiters = new Set<() => void>();
  #failure: LivemigError | undefined;
  #closed = false;

  /** Starts a reader for each of channels 1..count-1 as it joins the session. */
  constructor(o: IncomingChannelsOptions) {
    const { count, session, sink, join, onFailure } = o;
    this.count = count;
    this.#reached = new Array<number>(count).fill(0);
    this.#ended = new Array<boolean>(count).fill(false);
    this.#ended[0] = true; // the main connection is the migration's own
    this.#reached[0] = Number.MAX_SAFE_INTEGER;
    for (let k = 1; k < count; k++) {
      this.#run(k, session!, { ...sink, stripe: { channels: count, channel: k } }, join).catch((e: unknown) => {
        const err =
          e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_CONNECTION', `channel ${k}: ${(e as Error).message}`, { phase: 'receiving', cause: e });
        if (this.#closed || this.#failure) return;
        this.#failure = err;
        // the source's sends on the others end at once, not when the migration is torn down
        for (const conn of this.#conns) conn.close();
        this.#wake();
        onFailure(err);
      });
    }
  }

  /** The main connection's sink, which takes the stripes of channel 0. */
  static mainSink(sink: PageSink, count: number): PageSink {
    return count > 1 ? { ...sink, stripe: { channels: count, channel: 0 } } : sink;
  }

  async #run(k: number, session: PostcopySession, sink: PageSink, join: Join): Promise<void> {
    const slot = `channel-${k}` as const;
    const taken = await session.take(
      [slot],
      join.joinMs,
      () => new LivemigError('ERR_LIVEMIG_CONNECTION', `channel ${k} did not join within ${join.joinMs} ms`, { phase: 'receiving' }),
    );
    const conn = taken[slot]!;
    if (this.#closed) {
      conn.close();
      return;
    }
    this.#conns.push(conn);
    join.prepare(conn);
    // the answer lets the source send: nothing may follow a first frame before it is answered
    await conn.answerFirst(encodeAttached({ held: Buffer.alloc(0) }, join.version));
    for (;;) {
      const f = await conn.next(undefined, sink);
      this.pages += f.pages;
      if (f.type === FrameType.RoundEnd) {
        const r = decodeRoundEnd(f.payload);
        if (f.lastRound > r.round)
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `channel ${k}: ROUND_END for round ${r.round} after pages of round ${f.lastRound}`);
        if (r.round < this.#reached[k]!)
          throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `channel ${k}: ROUND_END for round ${r.round} after round ${this.#reached[k]}`);
        this.#reached[k] = r.round;
        if (r.last) this.#ended[k] = true;
        this.#wake();
        if (r.last) return;
        continue;
      }
      if (f.type === FrameType.Abort) throw sourceAborted(f.payload, 'receiving');
      throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `unexpected ${FrameType[f.type] ?? f.type} frame on channel ${k}`);
    }
  }

  /** Resolves once every channel has passed round `round`'s ROUND_END, or ended. */
  async reached(round: number): Promise<void> {
    await this.#until(() => this.#reached.every((r, k) => r >= round || this.#ended[k]));
  }

  /** Resolves once every channel has ended: all their pages are in the region. */
  async ended(): Promise<void> {
    await this.#until(() => this.#ended.every(Boolean));
  }

  async #until(done: () => boolean): Promise<void> {
    while (!done()) {
      if (this.#failure) throw this.#failure;
      if (this.#closed) throw new LivemigError('ERR_LIVEMIG_STATE', 'the channels are closed', { phase: 'receiving' });
      await new Promise<void>((resolve) => this.#waiters.add(resolve));
    }
  }

  #wake(): void {
    for (const w of [...this.#waiters]) w();
    this.#waiters.clear();
  }

  close(): void {
    this.#closed = true;
    for (const conn of this.#conns) conn.close();
    this.#wake();
  }
}
