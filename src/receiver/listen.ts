/**
 * The destination's listener: one migration at a time on a port; while it runs, further
 * connections may only join its post-copy session (ATTACH naming its token).
 */
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { ProtocolError } from '../protocol/errors.js';
import { FrameType, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeAttach, encodeError } from '../protocol/messages.js';
import type { WireChannel } from '../protocol/wire.js';
import { assertSecureEnough, openChannel } from '../security/tls.js';
import { trace } from '../trace.js';
import { receiveOn } from './receiver.js';
import { SessionTable } from './session.js';
import type { ReceiveOptions, ReceiveReport } from './types.js';

/** How long a joining connection has to send its ATTACH. */
const ATTACH_WAIT_MS = 5_000;

export interface Receiver {
  readonly port: number;
  readonly address: string;
  /** the next migration's outcome */
  next(): Promise<ReceiveReport>;
  close(): Promise<void>;
}

/** Listens and serves migrations one at a time. */
export async function listen(host: string, port: number, options: ReceiveOptions): Promise<Receiver> {
  assertSecureEnough(host, options.credentials, options.insecure, 'listening on');
  // pauseOnConnect: Node must not read from the connection before the native wire owns it
  const server = net.createServer({ noDelay: true, pauseOnConnect: true });
  const results: { resolve: (r: ReceiveReport) => void; reject: (e: unknown) => void }[] = [];
  const ready: Promise<ReceiveReport>[] = [];
  let busy = false;
  const sessions = new SessionTable();
  server.on('connection', (socket) => {
    if (busy) {
      void routeAttach(socket, sessions, options);
      return;
    }
    busy = true;
    const p = receiveOn(socket, options, sessions).finally(() => {
      busy = false;
    });
    p.catch(() => undefined); // handed to whoever calls next()
    const waiter = results.shift();
    if (waiter) p.then(waiter.resolve, waiter.reject);
    else ready.push(p);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) => reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot listen on ${host}:${port}: ${e.message}`, { phase: 'listen', cause: e })));
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  return {
    port: addr.port,
    address: addr.address,
    next: () => ready.shift() ?? new Promise((resolve, reject) => results.push({ resolve, reject })),
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/** A connection while a migration runs: its first frame must be ATTACH naming a live session. */
async function routeAttach(socket: net.Socket, sessions: SessionTable, options: ReceiveOptions): Promise<void> {
  let ch: WireChannel;
  try {
    // a joining connection authenticates like the first one: nobody else may attach to a session
    ch = (await openChannel(socket, options.credentials, 'server', options.authTimeoutMs ?? ATTACH_WAIT_MS)).channel;
  } catch (e) {
    // not authenticated, or no descriptor to take over: nothing to answer, but observers hear it
    trace('receiver', 'joining connection refused', { code: (e as LivemigError).code, reason: (e as Error).message });
    socket.destroy();
    return;
  }
  try {
    const f = await ch.next(ATTACH_WAIT_MS);
    if (f.type !== FrameType.Attach) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `a second connection must start with ATTACH, got ${FrameType[f.type] ?? f.type}`);
    const a = decodeAttach(f.payload);
    const session = sessions.get(a.session);
    if (!session) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'ATTACH names no session running here', { phase: 'attach' });
    session.join(a.role, ch);
  } catch (e) {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_PROTOCOL', (e as Error).message, { phase: 'attach', cause: e });
    await ch.finish(ch.closed ? undefined : encodeError({ code: err.code, message: err.message, phase: 'attach' }, PROTOCOL_VERSION));
  }
}
