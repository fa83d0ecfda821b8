/**
 * Connections a listener has accepted that have not sent their first frame yet: capped overall
 * and per address, so that idle or slow clients cannot make it hold without end. At a cap the
 * newcomer is let in and a pending connection of that address (or of the address holding the
 * most) goes, the oldest that has sent nothing first: a source that connects once and
 * authenticates in milliseconds gets through a crowd of idle ones, even from their own
 * address, where refusing newcomers would lock it out.
 */
import type net from 'node:net';
import { trace } from '../trace.js';

export class PendingConnections {
  readonly #max: number;
  readonly #maxPerAddress: number;
  readonly #byAddress = new Map<string, net.Socket[]>();
  readonly #evicted = new WeakSet<net.Socket>();
  /** taken when it arrives: a destroyed socket no longer says where it came from */
  readonly #addressOf = new Map<net.Socket, string>();
  #count = 0;

  constructor(max: number, maxPerAddress: number) {
    this.#max = max;
    this.#maxPerAddress = maxPerAddress;
  }

  get count(): number {
    return this.#count;
  }

  /** Takes `socket` in, letting another pending one go if a cap is reached. */
  add(socket: net.Socket): void {
    const from = socket.remoteAddress ?? '';
    if ((this.#byAddress.get(from)?.length ?? 0) >= this.#maxPerAddress) this.#evictFrom(from);
    else if (this.#count >= this.#max) this.#evictFrom(this.#heaviest(from));
    const list = this.#byAddress.get(from) ?? [];
    list.push(socket);
    this.#byAddress.set(from, list);
    this.#addressOf.set(socket, from);
    this.#count++;
  }

  /** `socket` is no longer pending (its first frame came, or its admission failed); once is enough. */
  settle(socket: net.Socket): void {
    const from = this.#addressOf.get(socket);
    if (from === undefined) return;
    this.#addressOf.delete(socket);
    const list = this.#byAddress.get(from)!;
    list.splice(list.indexOf(socket), 1);
    if (list.length === 0) this.#byAddress.delete(from);
    this.#count--;
  }

  /** Whether `socket` was let go here (load shed: not a refusal to report as one). */
  wasEvicted(socket: net.Socket): boolean {
    return this.#evicted.has(socket);
  }

  #heaviest(start: string): string {
    let heaviest = start;
    for (const [addr, list] of this.#byAddress) if (list.length > (this.#byAddress.get(heaviest)?.length ?? 0)) heaviest = addr;
    return heaviest;
  }

  #evictFrom(addr: string): void {
    // one that has sent nothing at all goes first: a source sends its first bytes at once
    const list = this.#byAddress.get(addr) ?? [];
    const victim = list.find((s) => s.bytesRead === 0) ?? list[0];
    if (!victim) return;
    trace('receiver', 'pending connection evicted', { from: addr, pending: this.#count });
    this.#evicted.add(victim);
    this.settle(victim);
    victim.destroy(); // its admission fails
  }
}
