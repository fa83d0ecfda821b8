/**
 * Taking a connection over from Node: its descriptor is duplicated into a native Wire (whose
 * records are sealed with the session's keys when the connection is encrypted) and Node's
 * socket(s) are destroyed, so that from then on only native code reads and writes it.
 */
import type net from 'node:net';
import { LivemigError } from '../errors.js';
import { addon, fromNative, type NativeWire, type WireKeys } from '../native.js';

const NO_FD = 'the connection has no file descriptor: a migration needs a connected TCP or Unix socket';

/**
 * A connected socket that nothing has read from. Accepting servers should use `pauseOnConnect`
 * so that Node never reads from the connection first.
 */
export function takeOverSocket(socket: net.Socket): NativeWire {
  if (socket.bytesRead > 0 || socket.readableLength > 0) {
    throw new LivemigError(
      'ERR_LIVEMIG_INVALID_ARGUMENT',
      'the connection was already read from: hand it over before any data is read (servers: pauseOnConnect)',
      { phase: 'connect' },
    );
  }
  return takeOver({ socket, done: [socket], noFd: NO_FD, what: 'taking over the connection' });
}

/**
 * A connection from which exactly `consumed` bytes were read (its first frame,
 * src/receiver/admit.ts) and nothing more is buffered. Encrypted, `keys.received` says how many
 * of the peer's records those bytes were.
 */
export function takeOverAfterFirstFrame(socket: net.Socket, consumed: number, keys?: WireKeys): NativeWire {
  if (socket.bytesRead !== consumed || socket.readableLength > 0) {
    throw new LivemigError('ERR_LIVEMIG_PROTOCOL', `the connection was read past its first frame (${socket.bytesRead} bytes, ${consumed} expected)`, {
      phase: 'handshake',
    });
  }
  return takeOver({ socket, done: [socket], noFd: NO_FD, what: 'taking over the connection', ...(keys ? { keys } : {}) });
}

/**
 * A connection on which a TLS handshake ran (src/security/tls.ts): `tls` must have stopped
 * reading with nothing of the peer's left unread (the handshake's closing exchange sees to
 * that). The TLS socket is destroyed without a close_notify, so the stream goes on in the clear
 * for the native data path (which is to carry its own records, keyed from the TLS session).
 */
export function takeOverSecured(raw: net.Socket, tls: net.Socket, keys: WireKeys): NativeWire {
  if (tls.readableLength > 0)
    throw new LivemigError('ERR_LIVEMIG_PROTOCOL', 'the peer sent data before the secured stream was handed over', { phase: 'handshake' });
  return takeOver({ socket: raw, done: [tls, raw], noFd: 'the secured connection has no file descriptor', what: 'taking over the secured connection', keys });
}

/**
 * Duplicates `socket`'s descriptor into a native Wire (whose records are sealed with `keys`,
 * if given), then destroys `done` (Node's side of it). `noFd` and `what` word the failures.
 */
function takeOver(o: { socket: net.Socket; done: net.Socket[]; noFd: string; what: string; keys?: WireKeys }): NativeWire {
  const fd = (o.socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', o.noFd, { phase: 'connect' });
  let wire: NativeWire;
  try {
    wire = o.keys ? new addon.Wire(fd, o.keys) : new addon.Wire(fd);
  } catch (e) {
    throw fromNative(e, 'ERR_LIVEMIG_CONNECTION', 'connect', o.what);
  }
  for (const s of o.done) s.destroy();
  return wire;
}
