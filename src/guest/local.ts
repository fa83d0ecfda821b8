/**
 * Same-host upgrade (`--local`): the guest's memory moves by reference. The source offers its
 * guest's memfds on a unix socket in a directory only its user may enter, and names it (with a
 * one-time token and this host's boot id) in HELLO, which travels on the authenticated
 * migration connection. The receiver checks that it runs on the same boot of the same host,
 * connects, presents the token and takes the descriptors; no page is copied.
 *   receiver -> source  'K' + token
 *   source -> receiver  'M' + region table (each region's offset in its memfd) + a memfd each
 *   receiver -> source  'm'
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { addon, callAsync, closeFd, type ControlMessage } from '../native.js';
import { Region } from '../region/region.js';
import { Tag } from './contract.js';
import { decodeRegions, encodeRegions } from './incoming-session.js';
import type { GuestLayout } from './layout.js';

const TAG_TOKEN = 0x4b; // K

/** What HELLO carries for a same-host upgrade. */
export interface LocalOffer {
  bootId: string;
  socket: string;
  token: string;
}

/** A file and the span of it one region is. */
export interface MemoryPiece {
  fd: number;
  offset: number;
  size: number;
}

/** This boot of this host: two processes on one host read the same. */
export function bootId(): string {
  return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
}

/** how long the destination may take between connecting and presenting its token */
const TOKEN_TIMEOUT_MS = 10_000;

/**
 * Source: offers `pieces` (one per region of `layout`) to whoever presents the token; `served`
 * settles once the destination has them (or after `timeoutMs`). close() withdraws the offer.
 */
export function offerMemory(
  layout: GuestLayout,
  pieces: readonly MemoryPiece[],
  timeoutMs: number,
): { offer: LocalOffer; served: Promise<void>; close(): void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-local-'));
  const socket = path.join(dir, 'memory.sock');
  const token = randomBytes(16).toString('hex');
  // Node's own listener: withdrawing the offer (a failed handshake) ends the wait at once
  const server = net.createServer({ pauseOnConnect: true });
  let closed = false;
  let timer: NodeJS.Timeout | undefined;
  const close = (): void => {
    if (closed) return;
    closed = true;
    // a withdrawn offer's timer must not hold the process: a refused `send --local` waited for it, 60 s
    clearTimeout(timer);
    server.close();
    rmSync(dir, { recursive: true, force: true });
  };
  const served = new Promise<void>((resolve, reject) => {
    timer = setTimeout(
      () => reject(new LivemigError('ERR_LIVEMIG_TIMEOUT', `the destination did not take the memory within ${timeoutMs} ms`, { phase: 'handshake' })),
      timeoutMs,
    );
    server.once('close', () => reject(new LivemigError('ERR_LIVEMIG_ABORTED', 'the memory offer was withdrawn', { phase: 'handshake' })));
    server.on('connection', (conn) => {
      // the descriptor is read and written natively; the socket itself stays paused
      const fd = (conn as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;
      handOver(fd, token, layout, pieces).then(
        () => {
          clearTimeout(timer);
          conn.destroy();
          close();
          resolve();
        },
        (e: unknown) => {
          conn.destroy();
          // a local process without the token is turned away; the destination may still come
          if (!(e instanceof LivemigError && e.code === 'ERR_LIVEMIG_AUTH')) {
            clearTimeout(timer);
            close();
            reject(e);
          }
        },
      );
    });
    server.listen(socket);
  });
  served.catch(() => undefined); // awaited by the caller
  return { offer: { bootId: bootId(), socket, token }, served, close };
}

async function handOver(fd: number, token: string, layout: GuestLayout, pieces: readonly MemoryPiece[]): Promise<void> {
  if (fd < 0) throw new LivemigError('ERR_LIVEMIG_SYSCALL', 'the memory connection has no descriptor', { phase: 'handshake' });
  const k = await receive(fd, TOKEN_TIMEOUT_MS, 'the destination presenting its token');
  for (const f of k.fds) closeFd(f, 'handshake');
  const got = Buffer.from(k.body);
  if (k.tag !== TAG_TOKEN || got.length !== 32 || !timingSafeEqual(got, Buffer.from(token))) {
    throw new LivemigError('ERR_LIVEMIG_AUTH', 'a process on this host asked for the guest memory without the migration token', { phase: 'handshake' });
  }
  addon.controlSend(
    fd,
    Tag.regions,
    encodeRegions({ layout, populate: false, offsets: pieces.map((p) => p.offset) }),
    pieces.map((p) => p.fd),
  );
  const m = await receive(fd, TOKEN_TIMEOUT_MS, 'the destination mapping the memory');
  for (const f of m.fds) closeFd(f, 'handshake');
  if (m.tag !== Tag.mapped)
    throw new LivemigError('ERR_LIVEMIG_REFUSED', `the destination could not take the memory: ${m.body.toString('utf8', 0, 300)}`, { phase: 'handshake' });
}

/**
 * Receiver: the source's memory, by reference (the pieces' descriptors are the caller's to close;
 * the region holds its own). Refused (ERR_LIVEMIG_NOT_LOCAL) when the source
 * runs on another host, or where its socket cannot be reached (another filesystem).
 */
export async function takeMemory(offer: LocalOffer, layout: GuestLayout, timeoutMs: number): Promise<{ region: Region; pieces: MemoryPiece[] }> {
  const here = bootId();
  if (offer.bootId !== here) {
    throw new LivemigError(
      'ERR_LIVEMIG_NOT_LOCAL',
      `a same-host upgrade (--local) from another host: the source's boot id is ${offer.bootId}, this host's ${here}; migrate without --local`,
      { phase: 'reserve' },
    );
  }
  let fd: number;
  try {
    fd = addon.unixConnect(offer.socket);
  } catch (e) {
    throw new LivemigError(
      'ERR_LIVEMIG_NOT_LOCAL',
      `a same-host upgrade (--local), but the source's socket ${offer.socket} cannot be reached from here ` +
        `(${(e as { errnoName?: string }).errnoName ?? (e as Error).message}): not the same filesystem`,
      { phase: 'reserve', cause: e },
    );
  }
  let m: ControlMessage | undefined;
  let handedOver = false;
  try {
    addon.controlSend(fd, TAG_TOKEN, Buffer.from(offer.token));
    m = await receive(fd, timeoutMs, "the source's memory");
    const table = m.tag === Tag.regions ? decodeRegions(m.body, "the source's region table") : undefined;
    if (!table) throw new LivemigError('ERR_LIVEMIG_PROTOCOL', `the source answered 0x${m.tag.toString(16)} instead of its memory`, { phase: 'reserve' });
    if (table.regions.length !== layout.regions.length || m.fds.length !== layout.regions.length) {
      throw new LivemigError(
        'ERR_LIVEMIG_PROTOCOL',
        `the source's memory is ${table.regions.length} regions with ${m.fds.length} descriptors; HELLO said ${layout.regions.length}`,
        { phase: 'reserve' },
      );
    }
    table.regions.forEach((r, i) => {
      const want = layout.regions[i]!;
      if (r.id !== want.id || r.size !== want.size)
        throw new LivemigError('ERR_LIVEMIG_PROTOCOL', `the source's region ${i} is ${r.size} bytes (id ${r.id}); HELLO said ${want.size} (id ${want.id})`, {
          phase: 'reserve',
        });
    });
    const fds = m.fds;
    const pieces = table.regions.map((r, i) => ({ fd: fds[i]!, offset: r.offset, size: r.size }));
    const region = Region.adoptPieces(pieces); // livemig's mapping keeps duplicates of its own
    try {
      addon.controlSend(fd, Tag.mapped);
    } catch (e) {
      region.release();
      throw e;
    }
    handedOver = true; // the pieces' descriptors go to the caller (and on to the guest)
    return { region, pieces };
  } catch (e) {
    try {
      addon.controlSend(fd, Tag.error, Buffer.from((e as Error).message.slice(0, 300)));
    } catch {
      // the source is gone: it learns of the failure on the migration connection
    }
    throw e;
  } finally {
    if (!handedOver) for (const f of m?.fds ?? []) closeFd(f, 'reserve');
    closeFd(fd, 'reserve');
  }
}

function receive(fd: number, timeoutMs: number, what: string): Promise<ControlMessage> {
  return callAsync('ERR_LIVEMIG_CONNECTION', 'handshake', `waiting for ${what}`, () => addon.controlReceiveAsync(fd, timeoutMs));
}
