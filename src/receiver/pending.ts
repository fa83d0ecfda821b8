/**
 * Connections a listener has accepted that have not sent their first frame yet: capped overall
 * and per address, so that idle or slow clients cannot make it hold without end, and ranked so
 * that a crowd cannot use the caps to evict or starve a real source, even from its own address
 * (a NAT, a shared host, an attacker on the source's host):
 *
 *   opening   accepted; nothing good enough to cost us work has come (nothing, junk, one byte)
 *   answered  TLS derived keys from its opening: it is in the middle of a real handshake
 *   proven    it proved the key (or certificate): it is no longer pending here as the others are
 *
 * Over a cap, the oldest opening connection goes first, then the oldest answered one; a proven
 * connection is never let go for an unproven one (it has a cap and a deadline of its own). A
 * connection is judged only once it has had `graceMs` to speak: connections accepted together
 * (the kernel hands a crowd's over in one batch) are not let go before the real one among them
 * was read at all. Past a hard cap (HARD_FACTOR times the soft one) the oldest goes at once.
 */
import type net from 'node:net';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';

export type PendingRank = 'opening' | 'answered' | 'proven';

export interface PendingLimits {
  /** unproven connections, overall and from one address */
  max: number;
  maxPerAddress: number;
  /** proven connections that have not sent their first frame yet */
  maxProven: number;
  /** how long a new connection has before it may be let go for a cap */
  graceMs: number;
}

/** How far over a soft cap connections may pile up while they are in their grace. */
const HARD_FACTOR = 4;

/** One pending connection, as admission sees it. */
export interface PendingTicket {
  /** TLS derived keys from its opening */
  answered(): void;
  /** it proved the key; `release` now lets go of everything it holds */
  proven(release: () => void): void;
  /** its first frame came, or its admission failed; once is enough */
  settle(): void;
  /** whether it was let go here (load shed: not a refusal to report as one) */
  readonly evicted: boolean;
}

interface Entry extends PendingTicket {
  from: string;
  at: number;
  rank: PendingRank;
  release: () => void;
}

export class PendingConnections {
  readonly #limits: PendingLimits;
  readonly #unproven: Entry[] = [];
  readonly #proven: Entry[] = [];
  #sweep: NodeJS.Timeout | undefined;

  constructor(limits: PendingLimits) {
    this.#limits = limits;
  }

  /** unproven and proven connections pending now */
  get count(): number {
    return this.#unproven.length + this.#proven.length;
  }

  get proven(): number {
    return this.#proven.length;
  }

  /** Takes `socket` in; over a cap, another pending connection (or, later, this one) may go. */
  add(socket: net.Socket): PendingTicket {
    let settled = false;
    const entry: Entry = {
      from: socket.remoteAddress ?? '',
      at: performance.now(),
      rank: 'opening',
      evicted: false,
      release: () => socket.destroy(),
      answered() {
        if (entry.rank === 'opening') entry.rank = 'answered';
      },
      proven: (release) => {
        if (settled || entry.rank === 'proven') return;
        this.#remove(this.#unproven, entry);
        entry.rank = 'proven';
        entry.at = performance.now();
        entry.release = release;
        this.#proven.push(entry);
        // proven ones crowd out only each other: the oldest silent one goes
        if (this.#proven.length > this.#limits.maxProven) this.#evict(this.#proven[0]!, 'proven');
      },
      settle: () => {
        if (settled) return;
        settled = true;
        this.#remove(entry.rank === 'proven' ? this.#proven : this.#unproven, entry);
      },
    };
    this.#unproven.push(entry);
    this.#enforce({ hardOnly: true });
    return entry;
  }

  /** Stops the sweep timer (the listener closed). */
  close(): void {
    clearTimeout(this.#sweep);
    this.#sweep = undefined;
  }

  #remove(list: Entry[], e: Entry): void {
    const i = list.indexOf(e);
    if (i >= 0) list.splice(i, 1);
  }

  /** Brings every count under its cap with whoever may go now; the rest waits for a sweep. */
  #enforce(o: { hardOnly: boolean }): void {
    const { hardOnly } = o;
    const { max, maxPerAddress, graceMs } = this.#limits;
    const now = performance.now();
    for (;;) {
      const perAddress = new Map<string, number>();
      for (const e of this.#unproven) perAddress.set(e.from, (perAddress.get(e.from) ?? 0) + 1);
      const overAddress = [...perAddress].filter(([, n]) => n > maxPerAddress).sort((a, b) => b[1] - a[1]);
      const over = this.#unproven.length > max;
      if (!over && overAddress.length === 0) return;
      // the address holding the most pays first; overall, so does the one holding the most
      const [addr, held] = overAddress[0] ?? [...perAddress].sort((a, b) => b[1] - a[1])[0]!;
      const hard = held > HARD_FACTOR * maxPerAddress || this.#unproven.length > HARD_FACTOR * max;
      const victim = this.#victim(addr, hard ? Infinity : now - graceMs);
      if (!victim || (hardOnly && !hard)) return this.#scheduleSweep();
      this.#evict(victim, 'unproven');
    }
  }

  /** The oldest opening connection of `addr` accepted before `before`, else the oldest answered one. */
  #victim(addr: string, before: number): Entry | undefined {
    const of = this.#unproven.filter((e) => e.from === addr && e.at <= before);
    return of.find((e) => e.rank === 'opening') ?? of[0];
  }

  #scheduleSweep(): void {
    if (this.#sweep) return;
    this.#sweep = setTimeout(() => {
      this.#sweep = undefined;
      this.#enforce({ hardOnly: false });
    }, this.#limits.graceMs);
    this.#sweep.unref();
  }

  #evict(victim: Entry, kind: 'unproven' | 'proven'): void {
    trace('receiver', ReceiverEvent.pendingEvicted, { from: victim.from, rank: victim.rank, pending: this.count });
    (victim as { evicted: boolean }).evicted = true;
    victim.settle();
    if (kind === 'proven') this.#remove(this.#proven, victim);
    victim.release(); // its admission fails
  }
}
