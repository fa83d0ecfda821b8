/**
 * Guests registered with the daemon. A running guest dials the daemon's guest socket
 * (`livemig serve --guests PATH`; lmg_source_register in the C library) and speaks the guest
 * contract on that connection exactly as on one livemig made (docs/GUEST.md): its hello names
 * it and hands over its regions. The daemon keeps the connection while the guest is listed, and
 * migrates it on the same connection. The socket is made mode 0600 in a directory of its own:
 * only root and the daemon's user may register (they are also who may read a guest's memory).
 */
import { chmodSync, lstatSync, mkdirSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { SourceGuestSession } from '../guest/source-session.js';
import { addon } from '../native.js';
import { trace } from '../trace.js';
import { DaemonEvent } from '../trace-events.js';

/** how long a guest that connected has to send its hello */
const HELLO_TIMEOUT_MS = 10_000;
/** how often idle guests are checked for having gone (their connection closed) */
const LIVENESS_MS = 500;

export type GuestState = 'idle' | 'migrating';

export interface GuestInfo {
  name: string;
  pid: number;
  state: GuestState;
  bytes: number;
  tracking: 'uffd-wp-async' | 'none';
  regions: { id: number; name: string; bytes: number }[];
  registered_at: string;
  /** the migration moving it now */
  migration?: string;
}

interface Entry {
  session: SourceGuestSession;
  state: GuestState;
  registeredAt: Date;
  migration: string | undefined;
}

export class GuestRegistry {
  readonly path: string;
  readonly #server: net.Server;
  readonly #guests = new Map<string, Entry>();
  readonly #timer: NodeJS.Timeout;

  private constructor(socketPath: string, server: net.Server) {
    this.path = socketPath;
    this.#server = server;
    this.#timer = setInterval(() => this.#dropGone(), LIVENESS_MS);
    this.#timer.unref();
  }

  static async open(socketPath: string): Promise<GuestRegistry> {
    if (socketPath.length === 0 || socketPath.length > 107)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `a guest socket path is 1..107 characters, got ${JSON.stringify(socketPath)}`, {
        phase: 'validate',
      });
    mkdirSync(path.dirname(socketPath), { recursive: true, mode: 0o700 });
    removeStaleSocket(socketPath);
    // pauseOnConnect: the connection's bytes are the native control messages', not Node's
    const server = net.createServer({ pauseOnConnect: true });
    const registry = new GuestRegistry(socketPath, server);
    server.on('connection', (conn) => void registry.#admit(conn));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) =>
        reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot listen for guests on ${socketPath}: ${e.message}`, { phase: 'listen', cause: e })),
      );
      server.listen(socketPath, () => resolve());
    });
    chmodSync(socketPath, 0o600);
    return registry;
  }

  async #admit(conn: net.Socket): Promise<void> {
    const nodeFd = (conn as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
    let fd = -1;
    try {
      fd = addon.unixDup(nodeFd);
    } catch (e) {
      trace('daemon', DaemonEvent.guestConnectionRefused, { reason: (e as Error).message });
    }
    conn.destroy(); // the session holds its own descriptor
    if (fd < 0) return;
    let session: SourceGuestSession;
    try {
      session = await SourceGuestSession.take(fd, HELLO_TIMEOUT_MS, 'a guest registering');
    } catch (e) {
      trace('daemon', DaemonEvent.guestRefused, { code: (e as LivemigError).code, reason: (e as Error).message });
      return;
    }
    const name = session.hello.name;
    const known = this.#guests.get(name);
    if (known && !known.session.gone) {
      // the guest dials again later: a name is one guest's until it goes
      trace('daemon', DaemonEvent.guestRefused, { name, reason: `a guest named ${name} is already registered (pid ${known.session.pid})` });
      session.close();
      return;
    }
    if (known) this.#remove(name);
    this.#guests.set(name, { session, state: 'idle', registeredAt: new Date(), migration: undefined });
    trace('daemon', DaemonEvent.guestRegistered, { name, pid: session.pid, bytes: session.region.size });
  }

  #dropGone(): void {
    for (const [name, e] of this.#guests) {
      if (e.state === 'idle' && e.session.gone) {
        trace('daemon', DaemonEvent.guestLeft, { name });
        this.#remove(name);
      }
    }
  }

  #remove(name: string): void {
    const e = this.#guests.get(name);
    if (!e) return;
    this.#guests.delete(name);
    e.session.close();
  }

  /** Whether a guest of this name is listed (and has not gone). */
  listed(name: string): boolean {
    const e = this.#guests.get(name);
    return e !== undefined && (e.state !== 'idle' || !e.session.gone);
  }

  list(): GuestInfo[] {
    this.#dropGone();
    return [...this.#guests.keys()].sort().map((n) => this.info(n)!);
  }

  info(name: string): GuestInfo | undefined {
    const e = this.#guests.get(name);
    if (!e) return undefined;
    const s = e.session;
    return {
      name,
      pid: s.pid,
      state: e.state,
      bytes: s.region.size,
      tracking: s.tracking,
      regions: s.layout.regions.map((r) => ({ id: r.id, name: r.name, bytes: r.size })),
      registered_at: e.registeredAt.toISOString(),
      ...(e.migration ? { migration: e.migration } : {}),
    };
  }

  /** The guest's session for migration `id`; refused when it is unknown, gone or already moving. */
  claim(name: string, id: string): SourceGuestSession {
    const e = this.#guests.get(name);
    if (!e || (e.state === 'idle' && e.session.gone)) {
      if (e) this.#remove(name);
      throw new LivemigError('ERR_LIVEMIG_NOT_FOUND', `no guest named ${JSON.stringify(name)} is registered here`, { phase: 'validate' });
    }
    if (e.state !== 'idle') throw new LivemigError('ERR_LIVEMIG_CONFLICT', `guest ${name} is already being migrated (${e.migration})`, { phase: 'validate' });
    e.state = 'migrating';
    e.migration = id;
    return e.session;
  }

  /**
   * The migration of `name` ended. `released`: the guest runs at the destination (its session
   * is closed). `kept`: it runs here and stays listed. `detached`: the outcome is not known (it
   * stays paused): the daemon lets it go, and it resumes by its lease or waits for `livemig resolve`.
   */
  settle(name: string, how: 'released' | 'kept' | 'detached'): void {
    const e = this.#guests.get(name);
    if (!e) return;
    if (how === 'kept' && !e.session.gone) {
      e.state = 'idle';
      e.migration = undefined;
      return;
    }
    this.#guests.delete(name);
    if (how !== 'released') e.session.close();
  }

  get size(): number {
    return this.#guests.size;
  }

  async close(): Promise<void> {
    clearInterval(this.#timer);
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
    removeStaleSocket(this.path);
    // idle guests see their connection close and dial again (a daemon that comes back finds them)
    for (const name of [...this.#guests.keys()]) if (this.#guests.get(name)!.state === 'idle') this.#remove(name);
  }
}

/** Removes a socket an earlier run left at `p` (nothing else: a file there is an error later). */
export function removeStaleSocket(p: string): void {
  try {
    if (lstatSync(p).isSocket()) unlinkSync(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT')
      throw new LivemigError('ERR_LIVEMIG_SYSCALL', `cannot remove the old socket ${p}: ${(e as Error).message}`, { phase: 'listen', cause: e });
  }
}
