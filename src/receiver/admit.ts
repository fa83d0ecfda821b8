/**
 * A new connection until its first frame: authenticated (with credentials), and its first
 * frame read within a deadline, in JavaScript, before the connection is handed to a native
 * Wire, with or without TLS: a client that connects and says nothing (a scan, a slow client,
 * an authenticated peer gone silent) holds no native thread, and the slot of a migration is
 * taken only by a HELLO that has arrived whole. With credentials the bytes after the TLS
 * handshake are records (native/io/records.h); they are opened here as they come (the Wire then
 * starts after them). The frames that open a connection (HELLO, ATTACH, RESOLVE) are small
 * control frames whose sender waits for an answer, so nothing may follow them yet: bytes after
 * the first frame are refused, here when they came with it, and by FramedConnection.answerFirst when
 * they came later. One rule, for both paths.
 */
import net from 'node:net';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import { LivemigError } from '../errors.js';
import { ProtocolError } from '../protocol/errors.js';
import { addon, call, closeFd, type WireKeys } from '../native.js';
import { HEADER_BYTES, type FrameType } from '../protocol/format.js';
import { CONTROL_MAX } from '../protocol/limits.js';
import { FramedConnection } from '../protocol/connection.js';
import type { WireFrame } from '../protocol/wire.js';
import { authenticateAccepted, type Authenticated, type Credentials, type SecurityReport } from '../security/tls.js';
import type { PendingTicket } from './pending.js';

export interface Admitted {
  conn: FramedConnection;
  security: SecurityReport;
  /** the address the peer reached */
  local: string;
  /** where the peer connected from (host:port) */
  remote: string;
  first: WireFrame;
}

/** The first frame as read: the frame, the bytes read for it, and how many records they were. */
interface FirstFrame {
  frame: WireFrame;
  consumed: number;
  records: number;
}

export async function admit(socket: net.Socket, creds: Credentials | undefined, timeoutMs: number, ticket?: PendingTicket): Promise<Admitted> {
  const local = socket.localAddress ?? '';
  const remote = `${socket.remoteAddress ?? ''}:${socket.remotePort ?? 0}`;
  trace('receiver', ReceiverEvent.connectionAccepted, { from: socket.remoteAddress ?? '' });
  if (!creds) {
    const { frame, consumed } = await readFirstFrame(socket, timeoutMs);
    return {
      conn: FramedConnection.fromSocketAfter(socket, consumed),
      security: { auth: 'none', peer: null, cipher: null, encrypted: false },
      local,
      remote,
      first: frame,
    };
  }
  const a = await authenticateAccepted(socket, creds, timeoutMs, () => ticket?.answered());
  const reader = readerAfterHandshake(a);
  ticket?.proven(() => reader.destroy());
  const security: SecurityReport = { auth: a.auth, peer: a.peer, cipher: a.cipher, encrypted: true };
  const { frame, consumed, records } = await readFirstFrame(reader, timeoutMs, a.receive);
  const keys: WireKeys = { send: a.send, receive: a.receive, received: records };
  return { conn: FramedConnection.fromSocketAfter(reader, consumed, keys), security, local, remote, first: frame };
}

/**
 * The connection after its TLS handshake, as a socket of its own that nothing has read from:
 * TLS stopped reading at its last record (src/security/tls.ts), so what comes next is the
 * peer's first sealed record. Node's TLS sockets are destroyed without a close_notify.
 */
function readerAfterHandshake(a: Authenticated): net.Socket {
  const fd = (a.raw as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'the secured connection has no file descriptor', { phase: 'handshake' });
  if (a.tls.readableLength > 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'the peer sent data before the secured stream was handed over');
  const copy = call('ERR_LIVEMIG_SYSCALL', 'handshake', 'duplicating the connection', () => addon.unixDup(fd));
  a.tls.destroy();
  a.raw.destroy();
  try {
    return new net.Socket({ fd: copy, readable: true, writable: true, pauseOnCreate: true } as net.SocketConstructorOpts);
  } catch (e) {
    closeFd(copy, 'handshake');
    throw new LivemigError('ERR_LIVEMIG_CONNECTION', `taking the secured connection back: ${(e as Error).message}`, { phase: 'handshake', cause: e });
  }
}

/**
 * Reads exactly one control frame from a socket nothing has read from yet; with `records`
 * (the peer's direction keys) the bytes are sealed records, opened as they come.
 */
function readFirstFrame(socket: net.Socket, timeoutMs: number, records?: { key: Buffer; salt: Buffer }): Promise<FirstFrame> {
  return new Promise((resolve, reject) => {
    let raw: Buffer = Buffer.alloc(0);
    let opened = 0; // bytes of `raw` opened into `plain`
    let recordCount = 0;
    let plain: Buffer = Buffer.alloc(0);
    let need = HEADER_BYTES;
    let header: { version: number; type: number; flags: number; length: number } | undefined;
    const done = (e?: Error, r?: FirstFrame): void => {
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
    const onEnd = (): void =>
      done(
        new LivemigError(
          'ERR_LIVEMIG_CONNECTION',
          raw.length ? 'the peer closed the connection in the middle of its first frame' : 'the peer closed the connection',
          { phase: 'handshake' },
        ),
      );
    const onError = (e: Error): void =>
      done(new LivemigError('ERR_LIVEMIG_CONNECTION', `the connection failed before its first frame: ${e.message}`, { phase: 'handshake', cause: e }));
    const onData = (d: Buffer): void => {
      raw = raw.length ? Buffer.concat([raw, d]) : d;
      try {
        if (records) {
          const r = call('ERR_LIVEMIG_AUTH', 'handshake', 'opening the first frame', () => addon.openStreamRecords(records, recordCount, raw.subarray(opened)));
          opened += r.consumed;
          recordCount += r.records;
          if (r.plain.length) plain = plain.length ? Buffer.concat([plain, r.plain]) : r.plain;
        } else {
          plain = raw;
          opened = raw.length;
        }
        if (!header && plain.length >= HEADER_BYTES) {
          header = checkHeader(plain);
          need = HEADER_BYTES + header.length;
        }
      } catch (e) {
        return done(e as Error);
      }
      if (plain.length < need) return;
      // nothing may follow the first frame before it is answered, and nothing more is read here
      (socket as unknown as { _handle?: { readStop?: () => number } })._handle?.readStop?.();
      socket.pause();
      const after = plain.length - need + (raw.length - opened);
      if (after > 0) return done(new ProtocolError('ERR_LIVEMIG_PROTOCOL', `${after} bytes came after the first frame, before it was answered`));
      const h = header!;
      const frame: WireFrame = {
        version: h.version,
        type: h.type as FrameType,
        flags: h.flags,
        payload: Buffer.from(plain.subarray(HEADER_BYTES)),
        pages: 0,
        batches: 0,
        bytes: 0,
        lastRound: -1,
      };
      done(undefined, { frame, consumed: raw.length, records: recordCount });
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
