/**
 * Mutual authentication before the first livemig frame, on every connection: a TLS handshake on the fresh connection with certificates (TLS 1.3, both
 * sides presenting one, names checked) or a pre-shared key (TLS 1.2 ECDHE-PSK, which keeps
 * forward secrecy; Node 20 has no external PSK for TLS 1.3), then a closing exchange after
 * which neither side's TLS layer reads, and the connection is handed to the native data path
 * with keys for each direction taken from the TLS exporter (RFC 5705 / RFC 8446 §7.5), which
 * seal every byte from then on in AEAD records (native/io/records.h).
 *
 *   client (source)                        server (destination)
 *     ClientHello ... Finished  ------->     (handshake; certificate names or PSK identity checked)
 *                               <-------     session tickets (TLS 1.3)
 *     "LMOK" (TLS record)       ------->     stops reading TLS, then
 *                               <-------     "LMGO" (its last TLS record)
 *     stops reading TLS; from here both speak livemig frames on the bare descriptor
 */
import net from 'node:net';
import tls from 'node:tls';
import { LivemigError } from '../errors.js';
import { FramedConnection } from '../protocol/connection.js';
import { CERT_REFUSAL, markRefusal, refusedCertificateWords, type RefusalReason } from '../refusals.js';
import { pskRefusalAtDestination, pskRefusalAtSource } from './psk-refusals.js';

export type Credentials =
  | {
      kind: 'cert';
      /** PEM: this side's certificate and key, and the CA its peer's certificate must chain to */
      cert: Buffer;
      key: Buffer;
      ca: Buffer;
      /** server: the client certificate names admitted (like QEMU's tls-authz); absent: any the CA signed */
      allow?: readonly string[];
      /** client: the name the server's certificate must carry */
      peerName?: string;
    }
  | { kind: 'psk'; identity: string; key: Buffer };

export interface DirectionKeys {
  key: Buffer;
  salt: Buffer;
}

export interface Secured {
  conn: FramedConnection;
  /** what this side seals with, and what it opens with (the peer's send keys) */
  send: DirectionKeys;
  receive: DirectionKeys;
  auth: 'tls-cert' | 'tls-psk';
  /** the peer's certificate name, or its PSK identity */
  peer: string;
  cipher: string;
}

const PSK_CIPHER = 'ECDHE-PSK-CHACHA20-POLY1305';
/** How long a source waits for any answer to its TLS hello before it says the peer does not speak TLS. */
const SILENT_PEER_MS = 5_000;
const EXPORTER_LABEL = 'EXPORTER-livemig-stream-v1';
const CLIENT_DONE = Buffer.from('LMOK');
const SERVER_DONE = Buffer.from('LMGO');
/** instead of SERVER_DONE: the server refuses the client's certificate; one byte follows (CERT_REFUSAL) */
const SERVER_REFUSES = Buffer.from('LMNO');
/** client to server key and salt, then server to client */
const KEY_BYTES = 32;
const SALT_BYTES = 4;

function refused(message: string, cause?: unknown, reason?: RefusalReason, peer?: string): LivemigError {
  const e = new LivemigError('ERR_LIVEMIG_AUTH', message, { phase: 'handshake', ...(cause === undefined ? {} : { cause }) });
  return reason === undefined ? e : markRefusal(e, reason, peer);
}

function keys(s: tls.TLSSocket, side: 'client' | 'server'): { send: DirectionKeys; receive: DirectionKeys } {
  const m = s.exportKeyingMaterial(2 * (KEY_BYTES + SALT_BYTES), EXPORTER_LABEL, Buffer.alloc(0));
  const c2s = { key: m.subarray(0, KEY_BYTES), salt: m.subarray(KEY_BYTES, KEY_BYTES + SALT_BYTES) };
  const s2c = { key: m.subarray(KEY_BYTES + SALT_BYTES, 2 * KEY_BYTES + SALT_BYTES), salt: m.subarray(2 * KEY_BYTES + SALT_BYTES) };
  return side === 'client' ? { send: c2s, receive: s2c } : { send: s2c, receive: c2s };
}

/** Stops the TLS layer reading from the descriptor at once (Node's pause() only stops the stream). */
function stopReading(s: tls.TLSSocket): void {
  (s as unknown as { _handle?: { readStop?: () => number } })._handle?.readStop?.();
}

/**
 * Resolves with `marker` once it has arrived (the peer's last TLS record); anything else is refused.
 * With `onRefusal` (the client), the server's SERVER_REFUSES and its category byte fail it with
 * onRefusal's error instead.
 */
function awaitMarker(s: tls.TLSSocket, marker: Buffer, timeoutMs: number, onArrived: () => void, onRefusal?: (category: number) => Error): Promise<void> {
  return new Promise((resolve, reject) => {
    let got = Buffer.alloc(0);
    const timer = setTimeout(
      () => fail(new LivemigError('ERR_LIVEMIG_TIMEOUT', `the peer did not finish the secure handshake within ${timeoutMs} ms`, { phase: 'handshake' })),
      timeoutMs,
    );
    const onError = (e: Error): void => fail(refused(`the secure handshake failed: ${e.message}`, e));
    const onClose = (): void => fail(refused('the peer closed the connection during the secure handshake'));
    const settle = (): void => {
      clearTimeout(timer);
      s.off('data', onData);
      s.off('error', onError);
      s.off('close', onClose);
    };
    const fail = (e: Error): void => {
      settle();
      reject(e);
    };
    const onData = (d: Buffer): void => {
      got = Buffer.concat([got, d]);
      const head = Math.min(got.length, SERVER_REFUSES.length);
      if (onRefusal && got.subarray(0, head).equals(SERVER_REFUSES.subarray(0, head))) {
        if (got.length <= SERVER_REFUSES.length) return; // its category byte is still to come
        return fail(onRefusal(got[SERVER_REFUSES.length]!));
      }
      if (got.length < marker.length) return;
      if (got.length > marker.length || !got.equals(marker))
        return fail(new LivemigError('ERR_LIVEMIG_PROTOCOL', 'unexpected data in the secure handshake', { phase: 'handshake' }));
      onArrived(); // in the same tick as the marker: nothing after it is read by TLS
      settle();
      resolve();
    };
    s.on('data', onData);
    s.on('error', onError);
    s.on('close', onClose);
  });
}

const write = (s: tls.TLSSocket, b: Buffer): Promise<void> =>
  new Promise((resolve, reject) => s.write(b, (e) => (e ? reject(refused(`the secure handshake failed: ${e.message}`, e)) : resolve())));

/** The source's side: authenticates the destination and itself, then hands the connection over. */
export async function secureConnect(raw: net.Socket, creds: Credentials, timeoutMs = 10_000): Promise<Secured> {
  const options: tls.ConnectionOptions =
    creds.kind === 'cert'
      ? {
          socket: raw,
          cert: creds.cert,
          key: creds.key,
          ca: creds.ca,
          minVersion: 'TLSv1.3',
          ...(creds.peerName ? { servername: creds.peerName } : { checkServerIdentity: () => undefined }),
        }
      : {
          socket: raw,
          ciphers: PSK_CIPHER,
          minVersion: 'TLSv1.2',
          maxVersion: 'TLSv1.2',
          checkServerIdentity: () => undefined,
          pskCallback: () => ({ psk: creds.key, identity: creds.identity }),
        };
  const s = tls.connect(options);
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => (clearTimeout(silent), reject(new LivemigError('ERR_LIVEMIG_TIMEOUT', `no secure handshake within ${timeoutMs} ms`, { phase: 'handshake' }))),
        timeoutMs,
      );
      // TLS derives keys (and reports them) once the peer answered our hello: a peer silent
      // that long does not speak TLS, and is not worth the whole handshake timeout
      const silentMs = Math.min(timeoutMs, SILENT_PEER_MS);
      const silent = setTimeout(
        () => (
          clearTimeout(timer),
          reject(
            refused(
              `the destination sent nothing back to our TLS hello within ${silentMs} ms: the peer does not speak TLS (a receiver without credentials, ` +
                `or another service?)`,
            ),
          )
        ),
        silentMs,
      );
      s.once('keylog', () => clearTimeout(silent));
      const settle = (): void => (clearTimeout(timer), clearTimeout(silent));
      s.once('secureConnect', () => (settle(), resolve()));
      s.once('error', (e) => (settle(), reject(pskRefusalAtSource(creds, e) ?? refused(`the destination could not be authenticated: ${e.message}`, e))));
    });
    if (creds.kind === 'cert' && !s.authorized) throw refused(`the destination's certificate is not trusted: ${String(s.authorizationError)}`);
    const peer = creds.kind === 'cert' ? String(s.getPeerCertificate().subject?.CN ?? '') : creds.identity;
    const k = keys(s, 'client');
    const cipher = s.getCipher().name;
    const ownName = (): string => String((s.getCertificate() as tls.PeerCertificate | null)?.subject?.CN ?? '');
    const done = awaitMarker(
      s,
      SERVER_DONE,
      timeoutMs,
      () => stopReading(s),
      (category) => refused(refusedCertificateWords(category, ownName())),
    );
    await write(s, CLIENT_DONE);
    await done;
    return { ...k, auth: creds.kind === 'cert' ? 'tls-cert' : 'tls-psk', peer, cipher, conn: FramedConnection.fromSecured(raw, s, k) };
  } catch (e) {
    s.destroy();
    throw e;
  }
}

/**
 * Tells a source whose certificate we refuse why, in one byte (the category; its words are the
 * source's), once it has sent CLIENT_DONE: its connection then holds nothing unread here, and
 * our close cannot reset away the answer. Best effort: a source that sends nothing hears nothing.
 */
async function tellRefusal(s: tls.TLSSocket, category: number, timeoutMs: number): Promise<void> {
  try {
    await awaitMarker(s, CLIENT_DONE, timeoutMs, () => undefined);
    await write(s, Buffer.concat([SERVER_REFUSES, Buffer.of(category)]));
  } catch {
    // the refusal stands whether or not the source heard why
  }
}

/** A connection the destination authenticated, not handed over yet: its TLS layer has stopped reading. */
export interface Authenticated extends Omit<Secured, 'conn'> {
  raw: net.Socket;
  tls: tls.TLSSocket;
}

/** The destination's side: authenticates the source (certificate name in `allow`, or PSK) and itself. */
export async function secureAccept(raw: net.Socket, creds: Credentials, timeoutMs = 10_000): Promise<Secured> {
  const a = await authenticateAccepted(raw, creds, timeoutMs);
  return { send: a.send, receive: a.receive, auth: a.auth, peer: a.peer, cipher: a.cipher, conn: FramedConnection.fromSecured(a.raw, a.tls, a) };
}

/**
 * secureAccept without the hand-over (src/receiver/admit.ts reads the first frame itself).
 * `onAnswered` is called once the peer's opening was good enough to cost us a key exchange
 * (TLS derived keys from it): admission ranks such a connection above one that sent nothing
 * or junk (src/receiver/pending.ts).
 */
export async function authenticateAccepted(raw: net.Socket, creds: Credentials, timeoutMs = 10_000, onAnswered?: () => void): Promise<Authenticated> {
  const acceptor = acceptorFor(creds);
  let s: tls.TLSSocket | undefined;
  try {
    s = await new Promise<tls.TLSSocket>((resolve, reject) => {
      const timer = setTimeout(
        () => done(new LivemigError('ERR_LIVEMIG_TIMEOUT', `no secure handshake within ${timeoutMs} ms`, { phase: 'handshake' })),
        timeoutMs,
      );
      const onClose = (): void => done(refused('the source closed the connection during the secure handshake', undefined, 'closed'));
      const done = (e: Error | undefined, t?: tls.TLSSocket): void => {
        clearTimeout(timer);
        raw.off('close', onClose);
        acceptor.waiting.delete(raw);
        if (e) reject(e);
        else resolve(t!);
      };
      acceptor.waiting.set(raw, { done, answered: onAnswered });
      raw.once('close', onClose);
      acceptor.server.emit('connection', raw);
    });
    let peer: string;
    if (creds.kind === 'cert') {
      peer = String(s.getPeerCertificate().subject?.CN ?? '');
      if (!s.authorized) {
        const why = `the source could not be authenticated: its certificate is not trusted (${String(s.authorizationError ?? 'none presented')})`;
        await tellRefusal(s, CERT_REFUSAL.untrusted, timeoutMs);
        throw refused(why, undefined, 'certificate-untrusted');
      }
      if (creds.allow && !creds.allow.includes(peer)) {
        await tellRefusal(s, CERT_REFUSAL.notAllowed, timeoutMs);
        throw refused(`the source's certificate names '${peer}', which --allow does not admit`, undefined, 'peer-not-allowed', peer);
      }
    } else {
      peer = acceptor.pskIdentity.get(s) ?? '';
    }
    const k = keys(s, 'server');
    const cipher = s.getCipher().name;
    await awaitMarker(s, CLIENT_DONE, timeoutMs, () => stopReading(s!));
    await write(s, SERVER_DONE);
    return { ...k, auth: creds.kind === 'cert' ? 'tls-cert' : 'tls-psk', peer, cipher, raw, tls: s };
  } catch (e) {
    s?.destroy();
    raw.destroy();
    throw e;
  }
}

/**
 * One tls.Server per set of credentials, which never listens: it wraps each connection we
 * accepted and works out whether the client's certificate chains to the CA (authorized,
 * authorizationError). Made once, not per connection: its secure context (the parsed
 * certificate, key and CA) cost about 1 ms a connection, which a crowd of connections that
 * never finish a handshake turned into the receiver's main work.
 */
interface Acceptor {
  server: tls.Server;
  /** connections mid-handshake, by the socket we accepted (the TLS socket's _parent) */
  waiting: Map<net.Socket, { done(e: Error | undefined, t?: tls.TLSSocket): void; answered: (() => void) | undefined }>;
  pskIdentity: WeakMap<tls.TLSSocket, string>;
}

const acceptors = new WeakMap<Credentials, Acceptor>();

function acceptorFor(creds: Credentials): Acceptor {
  const known = acceptors.get(creds);
  if (known) return known;
  const pskIdentity = new WeakMap<tls.TLSSocket, string>();
  const options: tls.TlsOptions =
    creds.kind === 'cert'
      ? // the chain is checked by the caller, so that a refusal says why (rejectUnauthorized only hangs up)
        { cert: creds.cert, key: creds.key, ca: creds.ca, requestCert: true, rejectUnauthorized: false, minVersion: 'TLSv1.3' }
      : {
          ciphers: PSK_CIPHER,
          minVersion: 'TLSv1.2',
          maxVersion: 'TLSv1.2',
          pskCallback: (t: tls.TLSSocket, identity: string) => {
            pskIdentity.set(t, identity);
            return identity === creds.identity ? creds.key : null;
          },
        };
  const server = tls.createServer(options);
  const waiting: Acceptor['waiting'] = new Map();
  const of = (t: tls.TLSSocket | undefined) => waiting.get((t as unknown as { _parent?: net.Socket } | undefined)?._parent as net.Socket);
  server.on('secureConnection', (t: tls.TLSSocket) => of(t)?.done(undefined, t));
  server.on('tlsClientError', (e: Error, t: tls.TLSSocket) => {
    const psk = pskRefusalAtDestination(creds, e, pskIdentity.get(t));
    of(t)?.done(psk ? refused(psk, e, 'psk-mismatch') : refused(`the source could not be authenticated: ${e.message}`, e));
  });
  // TLS derived keys from the client's hello: admission ranks the connection up (receiver/pending.ts)
  server.on('keylog', (_line: Buffer, t: tls.TLSSocket) => {
    const w = of(t);
    w?.answered?.();
    if (w) w.answered = undefined;
  });
  const made = { server, waiting, pskIdentity };
  acceptors.set(creds, made);
  return made;
}

/** What a report says of a connection's security. */
export interface SecurityReport {
  auth: 'tls-cert' | 'tls-psk' | 'none';
  /** the peer's certificate name or PSK identity; null without authentication */
  peer: string | null;
  cipher: string | null;
  /** whether every byte after the handshake crosses in AEAD records (native/io/records.h) */
  encrypted: boolean;
}

const INSECURE: SecurityReport = { auth: 'none', peer: null, cipher: null, encrypted: false };

/**
 * A fresh connection as a livemig FramedConnection: authenticated first when there are credentials
 * (`client`: we opened it; `server`: we accepted it), taken over as it is otherwise.
 */
export async function openConnection(
  socket: net.Socket,
  creds: Credentials | undefined,
  side: 'client' | 'server',
  timeoutMs: number,
): Promise<{ conn: FramedConnection; security: SecurityReport }> {
  if (!creds) return { conn: FramedConnection.fromSocket(socket), security: INSECURE };
  const s = side === 'client' ? await secureConnect(socket, creds, timeoutMs) : await secureAccept(socket, creds, timeoutMs);
  return { conn: s.conn, security: { auth: s.auth, peer: s.peer, cipher: s.cipher, encrypted: true } };
}

/** Loopback addresses: the one place a migration may run without credentials unasked. */
export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host) || /^::ffff:127\./.test(host);
}

/**
 * Secure by default: off loopback, a migration without credentials is refused unless asked for
 * on purpose. Returns nothing; throws ERR_LIVEMIG_INSECURE with how to fix it.
 */
export function assertSecureEnough(host: string, creds: Credentials | undefined, insecure: boolean | undefined, what: string): void {
  if (creds || insecure || isLoopback(host)) return;
  throw new LivemigError(
    'ERR_LIVEMIG_INSECURE',
    `${what} ${host} without credentials: anyone who reaches it could ` +
      `${what.startsWith('listening') ? 'send or activate a guest' : 'receive the guest'}. Give --tls-cert/--tls-key/--tls-ca (with --allow or ` +
      `--peer-name) or --psk-file, or pass --insecure on purpose`,
    { phase: 'validate' },
  );
}
