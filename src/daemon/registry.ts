/**
 * Guests registered with the daemon. A running guest dials the daemon's guest socket
 * (`livemig serve --guests PATH`; lmg_source_register in the C library) and speaks the guest
 * contract on that connection exactly as on one livemig made (docs/GUEST.md): its hello names
 * it and hands over its regions. The daemon keeps the connection while the guest is listed, and
 * migrates it on the same connection. The socket is made mode 0600 in a directory of its own:
 * only root and the daemon's user may register (they are also who may read a guest's memory).
 * A QEMU VM is registered by an API call instead (registerQemu: its QMP socket, qemu-guest.ts),
 * and listed until it is unregistered, migrated away, or its QEMU exits.
 */
import { chmodSync, lstatSync, mkdirSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { SourceGuestSession } from '../guest/source-session.js';
import { addon } from '../native.js';
import { trace } from '../trace.js';
import { DaemonEvent } from '../trace-events.js';
import { contractGuest, qemuGuest, type MovingGuest } from './moving-guest.js';
import { QemuGuest } from './qemu-guest.js';

/** how long a guest that connected has to send its hello */
const HELLO_TIMEOUT_MS = 10_000;
/** how often idle guests are checked for having gone (their connection closed) */
const LIVENESS_MS = 500;

export type GuestState = 'idle' | 'migrating';

export type GuestKind = 'contract' | 'qemu';

export interface GuestInfo {
  name: string;
  /** a guest that dialled the guest socket (docs/GUEST.md), or a QEMU VM registered by its QMP socket */
  kind: GuestKind;
  pid: number;
  state: GuestState;
  bytes: number;
  /** 'uffd-wp-async': its writes are tracked exactly (for QEMU: the preload library); 'none': livemig hashes its pages */
  tracking: 'uffd-wp-async' | 'none';
  regions: { id: number; name: string; bytes: number }[];
  registered_at: string;
  /** the migration moving it now */
  migration?: string;
  /** a QEMU VM: its QMP socket, its memory backend's file, and why it is tracked as it is */
  qemu?: { qmp: string; ram: string; tracking_reason: string };
}

type Entry = { state: GuestState; registeredAt: Date; migration: string | undefined } & (
  { kind: 'contract'; session: SourceGuestSession } | { kind: 'qemu'; vm: QemuGuest }
);

/** A claimed guest: what a migration moves, by open() (a QEMU VM is taken over QMP then: refused as `send --qemu` refuses it). */
export type ClaimedGuest = { open(): Promise<MovingGuest> } & ({ kind: 'contract'; session: SourceGuestSession } | { kind: 'qemu' });

const goneOf = (e: Entry): boolean => (e.kind === 'contract' ? e.session.gone : e.vm.gone);

export class GuestRegistry {
  readonly path: string;
  readonly #server: net.Server;
  readonly #guests = new Map<string, Entry>();
  /** names of QEMU VMs being checked for registration */
  readonly #pending = new Set<string>();
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
    if ((known && !goneOf(known)) || this.#pending.has(name)) {
      // the guest dials again later: a name is one guest's until it goes
      trace('daemon', DaemonEvent.guestRefused, { name, reason: `a guest named ${name} is already registered` });
      session.close();
      return;
    }
    if (known) this.#remove(name);
    this.#guests.set(name, { kind: 'contract', session, state: 'idle', registeredAt: new Date(), migration: undefined });
    trace('daemon', DaemonEvent.guestRegistered, { name, pid: session.pid, bytes: session.region.size });
  }

  /**
   * Registers the QEMU VM whose QMP socket is `qmp` as `name`, once it is checked as `send --qemu`
   * checks it (qemu-guest.ts); refused when the name or the VM is registered already.
   */
  async registerQemu(name: string, qmp: string): Promise<GuestInfo> {
    const taken = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_CONFLICT', why, { phase: 'validate' });
    if (this.listed(name) || this.#pending.has(name)) throw taken(`a guest named ${name} is already registered`);
    const same = [...this.#guests].find(([, e]) => e.kind === 'qemu' && e.vm.qmp === qmp && !e.vm.gone);
    if (same) throw taken(`the QEMU VM at ${qmp} is registered already, as ${same[0]}`);
    // the name is held while the VM is checked: two registrations of one name cannot both pass
    this.#pending.add(name);
    let vm: QemuGuest;
    try {
      vm = await QemuGuest.probe(qmp);
    } finally {
      this.#pending.delete(name);
    }
    // a contract guest may have dialled in under the name meanwhile; a path may name a VM registered under another
    if (this.listed(name)) throw taken(`a guest named ${name} registered meanwhile`);
    const vmTaken = [...this.#guests].find(([, e]) => e.kind === 'qemu' && e.vm.facts.pid === vm.facts.pid && !e.vm.gone);
    if (vmTaken) throw taken(`the QEMU VM at ${qmp} (pid ${vm.facts.pid}) is registered already, as ${vmTaken[0]}`);
    this.#remove(name); // a guest of that name that has gone
    this.#guests.set(name, { kind: 'qemu', vm, state: 'idle', registeredAt: new Date(), migration: undefined });
    trace('daemon', DaemonEvent.guestRegistered, { name, pid: vm.facts.pid, bytes: vm.facts.bytes });
    return this.info(name)!;
  }

  /** Unregisters a QEMU VM (it runs on, untouched); a contract guest is listed while its connection lasts, and leaves by closing it. */
  unregister(name: string): GuestInfo {
    const e = this.#guests.get(name);
    if (!e || (e.state === 'idle' && goneOf(e)))
      throw new LivemigError('ERR_LIVEMIG_NOT_FOUND', `no guest named ${JSON.stringify(name)} is registered here`, { phase: 'validate' });
    if (e.kind === 'contract')
      throw new LivemigError('ERR_LIVEMIG_STATE', `guest ${name} registered itself: it is listed while its connection lasts, and leaves by closing it`, {
        phase: 'validate',
      });
    if (e.state !== 'idle') throw new LivemigError('ERR_LIVEMIG_CONFLICT', `guest ${name} is being migrated (${e.migration})`, { phase: 'validate' });
    const info = this.info(name)!;
    this.#remove(name);
    trace('daemon', DaemonEvent.guestLeft, { name });
    return info;
  }

  #dropGone(): void {
    for (const [name, e] of this.#guests) {
      if (e.state === 'idle' && goneOf(e)) {
        trace('daemon', DaemonEvent.guestLeft, { name });
        this.#remove(name);
      }
    }
  }

  #remove(name: string): void {
    const e = this.#guests.get(name);
    if (!e) return;
    this.#guests.delete(name);
    if (e.kind === 'contract') e.session.close();
  }

  /** Whether a guest of this name is listed (and has not gone). */
  listed(name: string): boolean {
    const e = this.#guests.get(name);
    return e !== undefined && (e.state !== 'idle' || !goneOf(e));
  }

  list(): GuestInfo[] {
    this.#dropGone();
    return [...this.#guests.keys()].sort().map((n) => this.info(n)!);
  }

  info(name: string): GuestInfo | undefined {
    const e = this.#guests.get(name);
    if (!e) return undefined;
    const common = {
      name,
      kind: e.kind,
      state: e.state,
      registered_at: e.registeredAt.toISOString(),
      ...(e.migration ? { migration: e.migration } : {}),
    };
    if (e.kind === 'qemu') {
      const f = e.vm.facts;
      return {
        ...common,
        pid: f.pid,
        bytes: f.bytes,
        tracking: f.exact ? 'uffd-wp-async' : 'none',
        regions: [{ id: 0, name: f.memdev, bytes: f.bytes }],
        qemu: { qmp: e.vm.qmp, ram: f.ramPath, tracking_reason: f.trackingReason },
      };
    }
    const s = e.session;
    return {
      ...common,
      pid: s.pid,
      bytes: s.region.size,
      tracking: s.tracking,
      regions: s.layout.regions.map((r) => ({ id: r.id, name: r.name, bytes: r.size })),
    };
  }

  /** The guest, for migration `id`; refused when it is unknown, gone or already moving. */
  claim(name: string, id: string): ClaimedGuest {
    const e = this.#guests.get(name);
    if (!e || (e.state === 'idle' && goneOf(e))) {
      if (e) this.#remove(name);
      throw new LivemigError('ERR_LIVEMIG_NOT_FOUND', `no guest named ${JSON.stringify(name)} is registered here`, { phase: 'validate' });
    }
    if (e.state !== 'idle') throw new LivemigError('ERR_LIVEMIG_CONFLICT', `guest ${name} is already being migrated (${e.migration})`, { phase: 'validate' });
    e.state = 'migrating';
    e.migration = id;
    if (e.kind === 'contract') {
      const moving = contractGuest(e.session);
      return { kind: 'contract', session: e.session, open: async () => moving };
    }
    const vm = e.vm;
    return { kind: 'qemu', open: async () => qemuGuest(await vm.attach()) };
  }

  /**
   * The migration of `name` ended. `released`: the guest runs at the destination (its session
   * is closed). `kept`: it runs here and stays listed. `detached`: the outcome is not known (it
   * stays paused): the daemon lets it go, and it resumes by its lease or waits for `livemig resolve`.
   */
  settle(name: string, how: 'released' | 'kept' | 'detached'): void {
    const e = this.#guests.get(name);
    if (!e) return;
    if (how === 'kept' && !goneOf(e)) {
      e.state = 'idle';
      e.migration = undefined;
      return;
    }
    this.#guests.delete(name);
    if (how !== 'released' && e.kind === 'contract') e.session.close();
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
