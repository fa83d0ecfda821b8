/**
 * A guest process hands its region to livemig over a unix socket: one message with the
 * region's geometry and the guest's pid and mapping address, carrying the memfd by
 * SCM_RIGHTS. Afterwards the socket is an ordinary net.Socket for the guest's control
 * messages (pause, resume, device state), framed by whoever uses it.
 */
import net from 'node:net';
import { LivemigError, invalidArgument } from '../errors.js';
import { addon, call, callAsync, closeFd } from '../native.js';
import { PAGE_SIZE, Region } from './region.js';

export const HANDOVER_VERSION = 1;

/** What a guest says about its region when it hands it over. */
export interface GuestHello {
  version: number;
  pid: number;
  /** the guest's mapping address, decimal string (a u64 does not fit a JSON number) */
  address: string;
  size: number;
  pageSize: number;
  /** 'uffd-async' when the guest has registered its mapping with protectOwnRegion() */
  tracking: 'uffd-async' | 'none';
  /** free-form facts the guest wants to pass along (content, seed, ...) */
  info?: Record<string, unknown>;
  /**
   * 'fast': a second descriptor follows the memfd, a stream socket on which the guest answers
   * one-byte pause/resume requests from a thread of its own (native/process/control_msg.h has the framing)
   */
  control?: 'fast';
}

export interface HandOverOptions {
  tracking: GuestHello['tracking'];
  info?: Record<string, unknown>;
  /** the guest's end of a fast control socket (see GuestHello.control); livemig gets a copy */
  controlFd?: number;
}

/** Guest side: connect to livemig at `socketPath` and hand over `region`. */
export function handOverRegion(socketPath: string, region: Region, options: HandOverOptions): net.Socket {
  if (typeof socketPath !== 'string' || socketPath.length === 0) throw invalidArgument('socketPath must be a non-empty string');
  const hello: GuestHello = {
    version: HANDOVER_VERSION,
    pid: process.pid,
    address: region.address.toString(),
    size: region.size,
    pageSize: region.pageSize,
    tracking: options.tracking,
    ...(options.info ? { info: options.info } : {}),
    ...(options.controlFd !== undefined ? { control: 'fast' as const } : {}),
  };
  const fd = call('ERR_LIVEMIG_HANDOVER', 'handover', `connecting to ${socketPath}`, () => addon.unixConnect(socketPath));
  try {
    call('ERR_LIVEMIG_HANDOVER', 'handover', 'sending the region', () =>
      addon.sendWithFds(fd, Buffer.from(JSON.stringify(hello)), options.controlFd !== undefined ? [region.fd, options.controlFd] : [region.fd]),
    );
  } catch (e) {
    closeFd(fd, 'handover');
    throw e;
  }
  return new net.Socket({ fd, readable: true, writable: true });
}

export interface GuestConnection {
  region: Region;
  hello: GuestHello;
  pid: number;
  /** the guest's own mapping address (for tracking its writes) */
  address: bigint;
  socket: net.Socket;
  /** livemig's end of the guest's fast control socket, when it handed one over; else -1 */
  controlFd: number;
}

function rejectHello(why: string): LivemigError {
  return new LivemigError('ERR_LIVEMIG_HANDOVER', `guest handover rejected: ${why}`, { phase: 'handover' });
}

/** Checks a hello received from a guest; every field is untrusted. */
export function parseHello(data: Buffer): GuestHello {
  let h: unknown;
  try {
    h = JSON.parse(data.toString('utf8'));
  } catch {
    throw rejectHello('the message is not JSON');
  }
  if (typeof h !== 'object' || h === null) throw rejectHello('the message is not an object');
  const o = h as Record<string, unknown>;
  if (o.version !== HANDOVER_VERSION) throw rejectHello(`version ${String(o.version)} is not ${HANDOVER_VERSION}`);
  if (!Number.isSafeInteger(o.pid) || (o.pid as number) <= 0) throw rejectHello(`pid ${String(o.pid)} is not a positive integer`);
  if (o.pageSize !== PAGE_SIZE) throw rejectHello(`page size ${String(o.pageSize)} is not this host's ${PAGE_SIZE}`);
  if (!Number.isSafeInteger(o.size) || (o.size as number) <= 0 || (o.size as number) % PAGE_SIZE !== 0) {
    throw rejectHello(`size ${String(o.size)} is not a positive multiple of ${PAGE_SIZE}`);
  }
  if (typeof o.address !== 'string' || !/^[0-9]{1,20}$/.test(o.address)) throw rejectHello('address is not a decimal string');
  const address = BigInt(o.address);
  if (address === 0n || address % BigInt(PAGE_SIZE) !== 0n || address >= 1n << 64n) throw rejectHello(`address ${o.address} is not page-aligned`);
  if (o.tracking !== 'uffd-async' && o.tracking !== 'none') throw rejectHello(`tracking ${String(o.tracking)} is unknown`);
  if (o.info !== undefined && (typeof o.info !== 'object' || o.info === null)) throw rejectHello('info is not an object');
  if (o.control !== undefined && o.control !== 'fast') throw rejectHello(`control ${String(o.control)} is unknown`);
  return o as unknown as GuestHello;
}

/** livemig side: waits for guests to hand over their regions. */
export class GuestListener {
  readonly path: string;
  #fd: number;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.#fd = fd;
  }

  /** Listens on a unix socket path ('@name' for the abstract namespace). */
  static listen(path: string): GuestListener {
    if (typeof path !== 'string' || path.length === 0 || path.length > 107) throw invalidArgument('path must be a unix socket path of 1..107 characters');
    return new GuestListener(path, call('ERR_LIVEMIG_HANDOVER', 'handover', `listening on ${path}`, () => addon.unixListen(path)));
  }

  /** The next guest's region, or ERR_LIVEMIG_TIMEOUT after timeoutMs. */
  async accept(timeoutMs = 10_000): Promise<GuestConnection> {
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_STATE', 'the guest listener is closed', { phase: 'handover' });
    const conn = await callAsync('ERR_LIVEMIG_HANDOVER', 'handover', 'waiting for a guest', () => addon.unixAccept(this.#fd, timeoutMs)).catch(
      (e: LivemigError) => {
        throw e.errnoName === 'ETIMEDOUT' ? new LivemigError('ERR_LIVEMIG_TIMEOUT', `no guest connected within ${timeoutMs} ms`, { phase: 'handover', cause: e }) : e;
      },
    );
    let fds: number[] = [];
    try {
      const msg = await callAsync('ERR_LIVEMIG_HANDOVER', 'handover', 'receiving the region', () => addon.recvWithFds(conn, timeoutMs));
      fds = msg.fds;
      const hello = parseHello(msg.data);
      const expected = hello.control === 'fast' ? 2 : 1;
      if (fds.length !== expected) throw rejectHello(`expected ${expected === 2 ? 'two descriptors (the memfd, the control socket)' : 'one descriptor (the memfd)'}, got ${fds.length}`);
      const region = Region.adopt(fds[0]!, hello.size);
      const controlFd = expected === 2 ? fds.pop()! : -1; // kept: not closed below
      return { region, hello, pid: hello.pid, address: BigInt(hello.address), socket: new net.Socket({ fd: conn, readable: true, writable: true }), controlFd };
    } catch (e) {
      closeFd(conn, 'handover');
      throw e;
    } finally {
      for (const f of fds) closeFd(f, 'handover'); // adopt() duplicated the memfd it kept
    }
  }

  close(): void {
    if (this.#fd < 0) return;
    closeFd(this.#fd, 'handover');
    this.#fd = -1;
  }
}
