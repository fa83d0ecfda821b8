/**
 * livemig's end of the destination guest (docs/GUEST.md): starts the guest's command with a
 * socket path, connects when it listens, takes its hello, hands it the regions (the
 * destination's memory, one memfd window per region) and, when the migration gets there, its
 * device state, the post-copy registration and the word to run.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { addon, callAsync, closeFd, type ControlMessage, type GuestRange } from '../native.js';
import { PAGE_SIZE } from '../protocol/format.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import { agreeContract, connectWhenListening } from './connect.js';
import { GUEST_CONTRACT_DISKS, Tag, parseIncomingHello, refused, type IncomingHello } from './contract.js';
import { MAX_GUEST_REGIONS, type GuestLayout } from './layout.js';
import { placeGuest, type GuestPlacement } from './placement.js';

const CONTROL_TIMEOUT_MS = 2000;
/** the placeholder a guest command names its socket with */
export const SOCKET_PLACEHOLDER = '{socket}';
/** a daemon's guest command: the socket the guest registers at once it runs, and the name it registers under */
export const REGISTER_PLACEHOLDER = '{register}';
export const NAME_PLACEHOLDER = '{name}';

export interface IncomingStart {
  /** the guest's command line, one of whose words holds SOCKET_PLACEHOLDER */
  command: readonly string[];
  layout: GuestLayout;
  /** each region's memory: a descriptor (livemig keeps its own) and where the region starts in it */
  files: readonly { fd: number; offset: number }[];
  /** the guest's disk images here (contract 4), handed over after the regions in 'M' */
  disks?: readonly { name: string; size: number; fd: number }[];
  /** map every page ahead (pre-copy); false when post-copy is planned or nothing is copied */
  populate: boolean;
  /** register for post-copy at once (post-copy planned): the switch then waits for nothing */
  registerEarly?: boolean;
  /** for the guest to start, say hello and map its memory (default 120 s) */
  startTimeoutMs?: number;
  /** where the guest's stdout goes (default: this process's) */
  stdout?: 'inherit' | 'ignore';
  /** what fills REGISTER_PLACEHOLDER and NAME_PLACEHOLDER (a daemon's: the guest serves again there once it runs) */
  registerAt?: { socket: string; name: string };
  /**
   * the guest outlives this process (a daemon's): it runs in a session (and, under systemd, a
   * scope named after `unit`) of its own, its output appended to `log`, never to this process's pipes
   */
  outlive?: { unit: string; log: string };
}

/**
 * `command` with its placeholders filled in; refuses one without SOCKET_PLACEHOLDER, and one
 * naming REGISTER_PLACEHOLDER or NAME_PLACEHOLDER where nothing fills them (outside a daemon).
 */
export function guestCommand(command: readonly string[], socketPath: string, registerAt?: { socket: string; name: string }): string[] {
  if (!command.some((w) => w.includes(SOCKET_PLACEHOLDER))) {
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `the guest command must name its socket with ${SOCKET_PLACEHOLDER}: ${command.join(' ')}`, {
      phase: 'validate',
    });
  }
  const fill: [string, string | undefined][] = [
    [SOCKET_PLACEHOLDER, socketPath],
    [REGISTER_PLACEHOLDER, registerAt?.socket],
    [NAME_PLACEHOLDER, registerAt?.name],
  ];
  return command.map((w) =>
    fill.reduce((word, [placeholder, value]) => {
      if (!word.includes(placeholder)) return word;
      if (value === undefined)
        throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `only a daemon (livemig serve) fills ${placeholder} in a guest command: ${command.join(' ')}`, {
          phase: 'validate',
        });
      return word.split(placeholder).join(value);
    }, w),
  );
}

/**
 * The region table and flags of 'M' (docs/GUEST.md); each region's offset in its memfd. From
 * contract 4 the disk table follows: u32 count | count x (u64 size | u8 name length | name).
 */
export function encodeRegions(o: {
  layout: GuestLayout;
  populate: boolean;
  offsets: readonly number[];
  disks?: readonly { name: string; size: number }[];
}): Buffer {
  const { layout, populate, offsets } = o;
  const parts: Buffer[] = [Buffer.of(populate ? 1 : 0), u32(layout.regions.length)];
  for (const [i, r] of layout.regions.entries()) {
    const head = Buffer.alloc(21);
    head.writeUInt32LE(r.id, 0);
    head.writeBigUInt64LE(BigInt(r.size), 4);
    head.writeBigUInt64LE(BigInt(offsets[i]!), 12);
    head.writeUInt8(Buffer.byteLength(r.name), 20);
    parts.push(head, Buffer.from(r.name));
  }
  if (o.disks) {
    parts.push(u32(o.disks.length));
    for (const d of o.disks) {
      const head = Buffer.alloc(9);
      head.writeBigUInt64LE(BigInt(d.size), 0);
      head.writeUInt8(Buffer.byteLength(d.name), 8);
      parts.push(head, Buffer.from(d.name));
    }
  }
  return Buffer.concat(parts);
}
/** 'M' read back (the receiver of a same-host upgrade reads the source's); every field checked. */
export function decodeRegions(body: Buffer, what: string): { populate: boolean; regions: { id: number; name: string; size: number; offset: number }[] } {
  const bad = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_PROTOCOL', `${what}: ${why}`, { phase: 'reserve' });
  if (body.length < 5) throw bad(`a region table of ${body.length} bytes`);
  const count = body.readUInt32LE(1);
  if (count === 0 || count > MAX_GUEST_REGIONS) throw bad(`${count} regions (1..${MAX_GUEST_REGIONS})`);
  const regions: { id: number; name: string; size: number; offset: number }[] = [];
  let at = 5;
  for (let i = 0; i < count; i++) {
    if (body.length - at < 21) throw bad(`region ${i} is cut short`);
    const size = Number(body.readBigUInt64LE(at + 4));
    const offset = Number(body.readBigUInt64LE(at + 12));
    const nameLength = body.readUInt8(at + 20);
    if (body.length - at - 21 < nameLength) throw bad(`region ${i}'s name is cut short`);
    const name = body.toString('utf8', at + 21, at + 21 + nameLength);
    if (!Number.isSafeInteger(size) || !Number.isSafeInteger(offset) || offset % PAGE_SIZE !== 0) throw bad(`region ${i}: size or offset out of range`);
    regions.push({ id: body.readUInt32LE(at), name, size, offset });
    at += 21 + nameLength;
  }
  if (at !== body.length) throw bad(`${body.length - at} bytes after the table`);
  return { populate: (body[0]! & 1) === 1, regions };
}

/** Starts the guest: a child of this process, or (outlive) one in a session of its own, its output in a log file. */
function spawnGuest(argv: string[], o: IncomingStart): { child: ChildProcess; placement: GuestPlacement | 'child' } {
  if (!o.outlive) return { child: spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', o.stdout ?? 'inherit', 'inherit'] }), placement: 'child' };
  const placed = placeGuest(argv, o.outlive.unit);
  let log: number;
  try {
    log = openSync(o.outlive.log, 'a', 0o600);
  } catch (e) {
    throw new LivemigError('ERR_LIVEMIG_GUEST', `cannot open the guest's log ${o.outlive.log}: ${(e as Error).message}`, { phase: 'reserve', cause: e });
  }
  try {
    // detached: setsid(2), so that a signal to the daemon's process group does not reach it
    return { child: spawn(placed.argv[0]!, placed.argv.slice(1), { stdio: ['ignore', log, log], detached: true }), placement: placed.placement };
  } finally {
    closeSync(log);
  }
}

const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};

export class IncomingGuest {
  readonly child: ChildProcess;
  readonly hello: IncomingHello;
  readonly layout: GuestLayout;
  /** where it runs: in this process's session, or one (and a scope) of its own */
  placement: GuestPlacement | 'child' = 'child';
  #fd: number;
  #dir: string;
  #prepared: Promise<void> | undefined;
  #stateSent = false;
  #registered: { uffd: number; ranges: GuestRange[] } | undefined;
  /** the userfaultfd went to the caller, who closes it */
  #handedOver = false;

  private constructor(o: { child: ChildProcess; hello: IncomingHello; layout: GuestLayout; fd: number; dir: string }) {
    this.child = o.child;
    this.hello = o.hello;
    this.layout = o.layout;
    this.#fd = o.fd;
    this.#dir = o.dir;
  }

  /** Starts the guest and hands it its regions; resolves once it has mapped them. */
  static async start(o: IncomingStart): Promise<IncomingGuest> {
    if (o.files.length !== o.layout.regions.length)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `${o.files.length} files for ${o.layout.regions.length} regions`, { phase: 'validate' });
    // the socket in a directory only this user may enter: no other local process can reach
    // the guest before livemig does, nor hand it memory of its own
    const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-guest-'));
    const socketPath = path.join(dir, 'guest.sock');
    let child: ChildProcess | undefined;
    let fd = -1;
    try {
      const started = spawnGuest(guestCommand(o.command, socketPath, o.registerAt), o);
      child = started.child;
      const spawned = child;
      const failed = new Promise<never>((_, reject) => {
        spawned.once('error', (e) =>
          reject(new LivemigError('ERR_LIVEMIG_GUEST', `the guest command failed to start: ${e.message}`, { phase: 'handover', cause: e })),
        );
      });
      failed.catch(() => undefined);
      const timeoutMs = o.startTimeoutMs ?? 120_000;
      fd = await Promise.race([connectWhenListening(socketPath, timeoutMs, spawned), failed]);
      const hi = await IncomingGuest.#receive(fd, timeoutMs, "waiting for the incoming guest's hello");
      if (hi.tag !== Tag.hello) throw refused(`the incoming guest's first message is 0x${hi.tag.toString(16)}, not its hello ('H')`);
      const hello = parseIncomingHello(hi.body, hi.fds.length);
      await agreeContract(fd, hello, timeoutMs);
      const guest = new IncomingGuest({ child: spawned, hello, layout: o.layout, fd, dir });
      guest.placement = started.placement;
      const disks = o.disks?.length ? o.disks : undefined;
      if (disks && hello.contract < GUEST_CONTRACT_DISKS)
        throw new LivemigError(
          'ERR_LIVEMIG_GUEST',
          `the guest has ${disks.length} disk(s) and the incoming guest speaks contract ${hello.contract}: disks need ${GUEST_CONTRACT_DISKS}`,
          { phase: 'reserve' },
        );
      try {
        addon.controlSend(
          fd,
          Tag.regions,
          encodeRegions({
            layout: o.layout,
            populate: o.populate,
            offsets: o.files.map((f) => f.offset),
            ...(hello.contract >= GUEST_CONTRACT_DISKS ? { disks: disks ?? [] } : {}),
          }),
          [...o.files.map((f) => f.fd), ...(disks ?? []).map((d) => d.fd)],
        );
      } catch (e) {
        throw new LivemigError('ERR_LIVEMIG_GUEST', `handing the regions to the incoming guest failed: ${(e as Error).message}`, {
          phase: 'reserve',
          cause: e,
        });
      }
      // mapping (and populating) a gigabyte takes a while: waited for off this thread
      guest.#expect(await IncomingGuest.#receive(fd, timeoutMs, 'waiting for the incoming guest to map its regions'), Tag.regions, Tag.mapped, 'reserve');
      if (o.registerEarly) await guest.#register();
      return guest;
    } catch (e) {
      if (fd >= 0) closeFd(fd, 'handover');
      child?.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  }

  static async #receive(fd: number, timeoutMs: number, what: string): Promise<ControlMessage> {
    return callAsync('ERR_LIVEMIG_GUEST', 'handover', what, () => addon.controlReceiveAsync(fd, timeoutMs));
  }

  get pid(): number {
    return this.child.pid ?? 0;
  }

  /**
   * Post-copy: every region registered for minor faults; livemig's copy of the guest's
   * userfaultfd and where each region is mapped in the guest.
   */
  async register(): Promise<{ uffd: number; ranges: GuestRange[] }> {
    const reg = await this.#register();
    this.#handedOver = true;
    return reg;
  }

  async #register(): Promise<{ uffd: number; ranges: GuestRange[] }> {
    if (this.#registered) return this.#registered;
    await this.#prepared; // its answer comes first on the socket
    const r = this.#exchange(Tag.register, Tag.registered, 'postcopy');
    const n = this.layout.regions.length;
    try {
      if (r.fds.length !== 1)
        throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest's registration carried ${r.fds.length} descriptors, not its userfaultfd`, { phase: 'postcopy' });
      if (r.body.length !== 4 + 8 * n || r.body.readUInt32LE(0) !== n)
        throw new LivemigError(
          'ERR_LIVEMIG_GUEST',
          `the guest's registration names ${r.body.length >= 4 ? r.body.readUInt32LE(0) : '?'} addresses for ${n} regions`,
          { phase: 'postcopy' },
        );
    } catch (e) {
      for (const f of r.fds) closeFd(f, 'postcopy');
      throw e;
    }
    const ranges = this.layout.regions.map((reg, i) => ({ address: r.body.readBigUInt64LE(4 + 8 * i), firstPage: reg.firstPage, pages: reg.pages }));
    this.#registered = { uffd: r.fds[0]!, ranges };
    return this.#registered;
  }

  /**
   * Hands the guest its state ahead of activation: it checks and loads it, then waits. Called
   * when the device state arrives, before the source commits, so a state the guest refuses
   * fails the migration while the source can still resume its guest. The state goes at once;
   * the answer is read when the caller next waits, so the guest checks the state while the
   * caller goes on (the receiver computes its digest meanwhile).
   */
  prepare(deviceState: Buffer): Promise<void> {
    this.#prepared ??= Promise.resolve();
    if (!this.#stateSent) {
      this.#stateSent = true;
      try {
        this.#send(Tag.loadState, 'activate', deviceState);
      } catch (e) {
        this.#prepared = Promise.reject(e);
        return this.#prepared;
      }
      this.#prepared = this.#prepared.then(() => {
        this.#expect(this.#read('activate'), Tag.loadState, Tag.stateLoaded, 'activate');
        trace('receiver', ReceiverEvent.guestLoadedState);
      });
    }
    return this.#prepared;
  }

  /** Starts the guest (prepares first if need be). */
  async activate(deviceState: Buffer): Promise<void> {
    await this.prepare(deviceState);
    this.#send(Tag.go, 'activate');
    trace('receiver', ReceiverEvent.goSent);
    this.#expect(this.#read('activate'), Tag.go, Tag.going, 'activate');
    this.child.unref(); // the guest runs on its own; this process may exit before it
  }

  /**
   * Post-copy with disks: the guest's end of the socket its VMM asks for blocks on
   * (lmg_disk_fetch, lmg_disk_overwrite); the guest keeps its own copy.
   */
  giveDiskAsks(fd: number): void {
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the incoming guest is gone', { phase: 'postcopy' });
    try {
      addon.controlSend(this.#fd, Tag.diskAsks, undefined, [fd]);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest's socket failed: ${(e as Error).message}`, { phase: 'postcopy', cause: e });
    }
    this.#expect(this.#read('postcopy'), Tag.diskAsks, Tag.diskAsksTaken, 'postcopy');
  }

  /** Post-copy: every page is in place; the guest may drop its registration. */
  allPresent(): void {
    this.#exchange(Tag.allPresent, Tag.allPresentAck, 'postcopy');
  }

  /** livemig is done with the guest: it runs on (or, not told to run, exits). */
  close(): void {
    if (this.#fd >= 0) closeFd(this.#fd, 'guest');
    this.#fd = -1;
    if (this.#registered && !this.#handedOver) closeFd(this.#registered.uffd, 'guest');
    this.#registered = undefined;
    rmSync(this.#dir, { recursive: true, force: true });
  }

  kill(): void {
    this.child.kill('SIGKILL');
    this.close();
  }

  #send(tag: number, phase: string, body?: Buffer): void {
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the incoming guest is gone', { phase });
    try {
      addon.controlSend(this.#fd, tag, body);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest's socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
  }

  #read(phase: string): ControlMessage {
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the incoming guest is gone', { phase });
    try {
      return addon.controlReceive(this.#fd, CONTROL_TIMEOUT_MS);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest's socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
  }

  #expect(r: ControlMessage, request: number, answer: number, phase: string): ControlMessage {
    if (r.tag === answer) return r;
    for (const f of r.fds) closeFd(f, phase);
    if (r.tag === Tag.error)
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest refused '${String.fromCharCode(request)}': ${r.body.toString('utf8', 0, 300)}`, {
        phase,
      });
    throw new LivemigError('ERR_LIVEMIG_GUEST', `the incoming guest answered '${String.fromCharCode(r.tag)}' to '${String.fromCharCode(request)}'`, { phase });
  }

  #exchange(request: number, answer: number, phase: string): ControlMessage {
    this.#send(request, phase);
    return this.#expect(this.#read(phase), request, answer, phase);
  }
}
