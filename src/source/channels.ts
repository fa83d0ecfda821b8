/**
 * Parallel channels: pre-copy's pages spread over several connections, each authenticated and
 * encrypted like the first, each sent from a pool thread of its own and applied by a reader of
 * its own at the destination (docs/PROTOCOL.md, "Parallel channels").
 *
 * The ordering rule: page p always travels on channel floor(p / STRIPE_PAGES) mod N. Every copy
 * of a page therefore goes through one TCP stream, which delivers in order, so an older copy
 * can never overwrite a newer one, whatever the other channels are doing; and each channel's
 * dedup index knows only its own stripes, so a dup never names a page another channel may be
 * writing. No per-page sequence numbers and no barrier between rounds are needed while pages
 * flow. Order across channels matters only where the destination must have everything: a
 * round's ROUND_ACK (its receiver acknowledges a round only once every channel has passed that
 * round's ROUND_END) and the end of pre-copy: each extra channel ends with ROUND_END {last},
 * then the main connection's ROUND_END {last} is acknowledged only once all of them ended, and
 * from then on (the pause's last pages) every page goes on the main connection. Nothing of the
 * channels is left to wait for inside the pause.
 */
import os from 'node:os';
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { threadPoolSize } from '../native.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import { FrameType, MAX_CHANNELS, STRIPE_PAGES } from '../protocol/format.js';
import { peerError } from './peer.js';
import { encodeAttach, encodeRoundEnd, type RoundEnd } from '../protocol/messages.js';
import type { FramedConnection } from '../protocol/connection.js';
import type { PageEncoder, RoundPages } from '../encoding/encoder.js';
import type { EncodingStats } from '../encoding/encoder.js';
import type { LinkFigure } from '../encoding/chooser.js';

/** the most channels chosen without being asked: past 4 streams the raw ceiling here stops rising (bench/channels) */
const DEFAULT_MAX = 4;
/** pool threads a source holds besides its channels' sends: the main connection's read-ahead, and one for the rest */
const POOL_RESERVE = 2;

export interface ChannelChoice {
  count: number;
  reason: string;
}

/**
 * How many channels to ask for: the caller's number, or one per core up to DEFAULT_MAX, never
 * more than libuv's pool can run at once (each channel's send holds a pool thread while it
 * waits for its socket).
 */
export function chooseChannels(o: { asked: number | undefined; canConnect: boolean }): ChannelChoice {
  const { asked, canConnect } = o;
  const pool = threadPoolSize();
  const poolRoom = Math.max(1, pool - POOL_RESERVE);
  if (asked !== undefined) {
    if (asked > 1 && !canConnect)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'channels above 1 need `connect` (a way to open more connections) when `to` is a socket', {
        phase: 'validate',
      });
    if (asked > poolRoom)
      throw new LivemigError(
        'ERR_LIVEMIG_INVALID_ARGUMENT',
        `channels ${asked} need ${asked + POOL_RESERVE} threads in libuv's pool, which has ${pool}: start the process with ` +
          `UV_THREADPOOL_SIZE=${asked + POOL_RESERVE} or more`,
        { phase: 'validate' },
      );
    return { count: asked, reason: 'asked for' };
  }
  if (!canConnect) return { count: 1, reason: '`to` is a socket and no `connect` was given' };
  const cores = os.availableParallelism();
  const count = Math.max(1, Math.min(DEFAULT_MAX, cores, poolRoom));
  const why =
    count === cores
      ? `one per core (${cores})`
      : count === poolRoom && poolRoom < Math.min(DEFAULT_MAX, cores)
        ? `what libuv's pool of ${pool} threads carries`
        : `${DEFAULT_MAX} at most`;
  return { count, reason: `${why}; the destination may grant fewer` };
}

/** Checks a caller's `channels`; undefined when not given. */
export function checkChannels(v: unknown): number | undefined {
  if (v === undefined) return undefined;
  if (!Number.isInteger(v) || (v as number) < 1 || (v as number) > MAX_CHANNELS)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `channels must be an integer from 1 to ${MAX_CHANNELS}, got ${String(v)}`, { phase: 'validate' });
  return v as number;
}

/** Whether further connections can be opened to this destination. */
export const canConnect = (to: unknown, connect: unknown): boolean => connect !== undefined || !(to instanceof net.Socket);

/** Channel k's stripes of `pages` (ascending), for every k: the rule above. */
export function splitByStripe(pages: Uint32Array, n: number): Uint32Array[] {
  const counts = new Uint32Array(n);
  for (let i = 0; i < pages.length; i++) counts[Math.floor(pages[i]! / STRIPE_PAGES) % n]!++;
  const out = Array.from({ length: n }, (_, k) => new Uint32Array(counts[k]!));
  counts.fill(0);
  for (let i = 0; i < pages.length; i++) {
    const p = pages[i]!;
    const k = Math.floor(p / STRIPE_PAGES) % n;
    out[k]![counts[k]!++] = p;
  }
  return out;
}

/**
 * pages per call of the plain path (no encoder) outside the pause: progress sees a call's
 * pages when it returns, so a pass is not one call of gigabytes (64 MiB of 4 KiB pages)
 */
const PLAIN_RUN_PAGES = 16384;

/** One channel of a migration: its connection and what sends its pages. */
export interface OutgoingChannel {
  conn: FramedConnection;
  encoder: PageEncoder | undefined;
  /** pages sent on it in the current round */
  roundPages: number;
}

/** Sends pages on a channel without an encoder (plain PAGES frames); the bytes written. */
export type SendPlain = (conn: FramedConnection, r: number, pages: Uint32Array) => Promise<number>;

/** What OutgoingChannels starts with. */
export interface OutgoingChannelsOptions {
  /** every channel, the main connection (channel 0) first */
  channels: OutgoingChannel[];
  /** how a channel without an encoder sends its pages */
  sendPlain: SendPlain;
}

/** The channels of a migration, the main connection (channel 0) first. */
export class OutgoingChannels {
  readonly all: OutgoingChannel[];
  readonly #plain: SendPlain;
  #ended = false;
  #acked = false;
  /** bytes of completed sends, and those plus what the runs of the current one reported */
  #bytesBefore = 0;
  #bytes = 0;
  #ms = 0;
  #since: number | undefined;
  /** pages the runs of the current send reported so far */
  #pagesInSend = 0;

  constructor(o: OutgoingChannelsOptions) {
    this.all = o.channels;
    this.#plain = o.sendPlain;
  }

  get count(): number {
    return this.all.length;
  }

  /** Sends a round's pages, each on its stripe's channel, the channels at once; the bytes written. */
  async send(o: RoundPages): Promise<number> {
    const { round: r, pages, final = false } = o;
    // once the extra channels ended, every page goes on the main connection
    const parts = this.count === 1 || this.#ended ? [pages] : splitByStripe(pages, this.count);
    const t0 = performance.now();
    this.#since = t0;
    this.#pagesInSend = 0;
    const sent = await Promise.all(
      parts.map((part, k) => {
        const channel = this.all[k]!;
        channel.roundPages += part.length;
        if (part.length === 0) return 0;
        if (channel.encoder) return channel.encoder.send({ round: r, pages: part, final });
        return final ? this.#plain(channel.conn, r, part) : this.#plainRuns(channel.conn, r, part);
      }),
    );
    const bytes = sent.reduce((a, b) => a + b, 0);
    this.#bytes = this.#bytesBefore += bytes;
    this.#pagesInSend = 0;
    this.#ms += performance.now() - t0;
    this.#since = undefined;
    return bytes;
  }

  async #plainRuns(conn: FramedConnection, r: number, pages: Uint32Array): Promise<number> {
    let bytes = 0;
    for (let at = 0; at < pages.length; at += PLAIN_RUN_PAGES) {
      const part = pages.subarray(at, at + PLAIN_RUN_PAGES);
      const b = await this.#plain(conn, r, part);
      bytes += b;
      this.noteSent(b, part.length);
    }
    return bytes;
  }

  /** A run went (during a send): the link figure and progress grow as the bytes go, not only after the call. */
  noteSent(bytes: number, pages: number): void {
    this.#bytes += bytes;
    this.#pagesInSend += pages;
  }

  /** What the send under way put on the wire so far: its bytes and pages (zero between sends). */
  inFlight(): { bytes: number; pages: number } {
    return { bytes: this.#bytes - this.#bytesBefore, pages: this.#pagesInSend };
  }

  /** The link so far: what every channel took, over the wall time of the sends (pacing's sleeps left out). */
  link(): LinkFigure {
    const running = this.#since !== undefined ? performance.now() - this.#since : 0;
    return { bytes: this.#bytes, ms: this.#ms + running, channels: this.count };
  }

  /**
   * ROUND_END on every extra channel (the main one's goes with the round's statistics): its
   * pages of that round all went before it. `last`: nothing more follows on them.
   */
  async endRound(round: number, version: number, o: { last?: boolean } = {}): Promise<void> {
    const last = o.last === true;
    if (this.#ended) return;
    if (last) this.#ended = true;
    await Promise.all(
      this.all.slice(1).map((c) => c.conn.send(encodeRoundEnd({ round, pages: c.roundPages, ...(last ? { last: true as const } : {}) }, version))),
    );
    for (const c of this.all) c.roundPages = 0;
  }

  /** Whether every page goes on the main connection now (the extra channels ended, or there are none). */
  get narrowed(): boolean {
    return this.count === 1 || this.#acked;
  }

  /**
   * Ends the extra channels during round `round`: each gets ROUND_END {last}, then the main
   * connection ROUND_END {round, pages: 0, last}, whose ROUND_ACK {last} the destination sends
   * once every channel has ended; from then on every page goes on the main connection. Earlier
   * rounds' acknowledgements read on the way are noted, not lost.
   */
  async narrow(round: number, version: number, readAck: () => Promise<RoundEnd>, why?: string): Promise<void> {
    if (this.count === 1 || this.#ended) return;
    trace('source', SourceEvent.channelsEnd, { round, why: why ?? 'the end of pre-copy' });
    await this.endRound(round, version, { last: true });
    await this.all[0]!.conn.send(encodeRoundEnd({ round, pages: 0, last: true }, version));
    for (;;) {
      const ack = await readAck();
      if (ack.last) break;
      // (the answer to {last} is not the round's own acknowledgement, which follows its ROUND_END)
      this.ackedRound = Math.max(this.ackedRound, ack.round);
    }
    this.#acked = true;
    this.narrowedWhy = why;
    trace('source', SourceEvent.channelsEnded, { round });
  }

  /** the highest round the destination acknowledged as read on the way (narrow()) */
  ackedRound = 0;
  /** why the extra channels ended before the end of pre-copy, if they did */
  narrowedWhy: string | undefined;

  /** Every channel's encoding counts, summed. */
  stats(): EncodingStats | undefined {
    const all = this.all.map((c) => c.encoder?.stats).filter((s): s is EncodingStats => s !== undefined);
    if (all.length === 0) return undefined;
    const sum: EncodingStats = { zero_pages: 0, dup_pages: 0, lz4_pages: 0, raw_pages: 0, skipped_pages: 0, lz4_in: 0, lz4_out: 0 };
    for (const s of all) for (const k of Object.keys(sum) as (keyof EncodingStats)[]) sum[k] += s[k];
    return sum;
  }

  async closeEncoders(): Promise<void> {
    await Promise.all(this.all.map((c) => c.encoder?.close()));
  }

  /** Closes the extra channels (the main one is the migration's own to close). */
  closeExtras(): void {
    for (const c of this.all.slice(1)) c.conn.close();
  }
}

/** Which channel attachChannel opens, and how. */
export interface AttachChannel {
  /** opens a further connection to the destination (authenticated like the first) */
  open: () => Promise<FramedConnection>;
  /** the session token the destination's ACCEPT gave */
  session: string;
  /** the channel's index, 1.. (the main connection is 0) */
  channel: number;
  version: number;
  /** how long ATTACHED may take */
  timeoutMs: number;
}

/**
 * Opens a channel of the session, names it with ATTACH and waits for ATTACHED (a receiver
 * refuses a connection that sends more before its first frame is answered); closed again on
 * failure.
 */
export async function attachChannel(o: AttachChannel): Promise<FramedConnection> {
  const conn = await o.open();
  try {
    await conn.send(encodeAttach({ session: o.session, role: 'channel', channel: o.channel }, o.version));
    await conn.expect(FrameType.Attached, (f) => peerError(f, 'handshake'), o.timeoutMs);
  } catch (e) {
    conn.close();
    throw e;
  }
  return conn;
}
