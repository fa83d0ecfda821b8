/**
 * A new connection until its first frame: authenticated (with credentials), and its first
 * frame read within a deadline. Without credentials the first frame is read here, in
 * JavaScript, before the connection is handed to a native Wire: a client that connects and
 * says nothing (a scan, a slow client) then holds no native read thread, and the slot of the
 * migration is taken only by a HELLO that has arrived whole. The frames that open a
 * connection (HELLO, ATTACH, RESOLVE) are small control frames, and their sender waits for an
 * answer, so nothing may follow them yet: bytes after the first frame are refused.
 */
import { trace } from '../trace.js';
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { ProtocolError } from '../protocol/errors.js';
import { addon, call } from '../native.js';
import { HEADER_BYTES, type FrameType } from '../protocol/format.js';
import { CONTROL_MAX } from '../protocol/limits.js';
import { WireChannel, type WireFrame } from '../protocol/wire.js';
import { openChannel, type Credentials, type SecurityReport } from '../security/tls.js';

export interface Admitted {
  channel: WireChannel;
  security: SecurityReport;
  /** the address the peer reached */
  local: string;
  /** where the peer connected from (host:port) */
  remote: string;
  first: WireFrame;
}

export async function admit(socket: net.Socket, creds: Credentials | undefined, timeoutMs: number): Promise<Admitted> {
  const local = socket.localAddress ?? '';
  const remote = `${socket.remoteAddress ?? ''}:${socket.remotePort ?? 0}`;
  trace('receiver', 'connection accepted', { from: socket.remoteAddress ?? '' });
  if (creds) {
    const { channel, security } = await openChannel(socket, creds, 'server', timeoutMs);
    try {
      return { channel, security, local, remote, first: await channel.next(timeoutMs) };
    } catch (e) {
      channel.close();
      throw e;
    }
  }
  const { frame, consumed } = await readFirstFrame(socket, timeoutMs);
  const channel = WireChannel.fromSocketAfter(socket, consumed);
  return { channel, security: { auth: 'none', peer: null, cipher: null, encrypted: false }, local, remote, first: frame };
}

/** Reads exactly one control frame from a socket nothing has read from yet. */
function readFirstFrame(socket: net.Socket, timeoutMs: number): Promise<{ frame: WireFrame; consumed: number }> {
  return new Promise((resolve, reject) => {
    let got: Buffer = Buffer.alloc(0);
    let need = HEADER_BYTES;
    let header: { version: number; type: number; flags: number; length: number } | undefined;
    const done = (e?: Error, r?: { frame: WireFrame; consumed: number }): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('end', onEnd);
      socket.off('error', onError);
      socket.off('close', onEnd);
      if (e) {
        socket.destroy();
        reject(e);
      } else resolve(r!);
    };
    const timer = setTimeout(() => done(new LivemigError('ERR_LIVEMIG_TIMEOUT', `no first frame within ${timeoutMs} ms`, { phase: 'handshake' })), timeoutMs);
    const onEnd = (): void => done(new LivemigError('ERR_LIVEMIG_CONNECTION', got.length ? 'the peer closed the connection in the middle of its first frame' : 'the peer closed the connection', { phase: 'handshake' }));
    const onError = (e: Error): void => done(new LivemigError('ERR_LIVEMIG_CONNECTION', `the connection failed before its first frame: ${e.message}`, { phase: 'handshake', cause: e }));
    const onData = (d: Buffer): void => {
      got = got.length ? Buffer.concat([got, d]) : d;
      if (!header && got.length >= HEADER_BYTES) {
        try {
          header = checkHeader(got);
        } catch (e) {
          return done(e as Error);
        }
        need = HEADER_BYTES + header.length;
      }
      if (got.length < need) return;
      // nothing may follow the first frame before it is answered, and nothing more is read here
      (socket as unknown as { _handle?: { readStop?: () => number } })._handle?.readStop?.();
      socket.pause();
      if (got.length > need) return done(new ProtocolError('ERR_LIVEMIG_PROTOCOL', `${got.length - need} bytes came after the first frame, before it was answered`));
      const h = header!;
      done(undefined, { frame: { version: h.version, type: h.type as FrameType, flags: h.flags, payload: Buffer.from(got.subarray(HEADER_BYTES)), pages: 0, batches: 0, bytes: 0, lastRound: -1 }, consumed: need });
    };
    socket.on('data', onData);
    socket.once('end', onEnd);
    socket.once('error', onError);
    socket.once('close', onEnd); // destroyed here (evicted from the pending ones)
    socket.resume();
  });
}

/** The wire's header rules (native/wire/format.cc), for a first frame: a control frame, small. */
function checkHeader(b: Buffer): { version: number; type: number; flags: number; length: number } {
  return call('ERR_LIVEMIG_PROTOCOL', 'handshake', 'checking the first frame', () => addon.checkFrameHeader(b, CONTROL_MAX));
}
