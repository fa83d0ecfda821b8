/**
 * The destination's listener: one migration at a time on a port; while it runs, further
 * connections may only join its post-copy session (ATTACH naming its token) or ask what became
 * of a session (RESOLVE), which any connection may do at any time.
 */
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { ProtocolError } from '../protocol/errors.js';
import { FrameType, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeAttach, decodeResolve, encodeError, encodeResolved } from '../protocol/messages.js';
import type { WireChannel, WireFrame } from '../protocol/wire.js';
import { assertSecureEnough, openChannel } from '../security/tls.js';
import { trace } from '../trace.js';
import { OutcomeTable } from './outcomes.js';
import { openIncoming, refusedBeforeReserving, serveMigration } from './receiver.js';
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
  const outcomes = new OutcomeTable();
  const deliver = (p: Promise<ReceiveReport>): void => {
    p.catch(() => undefined); // handed to whoever calls next()
    const waiter = results.shift();
    if (waiter) p.then(waiter.resolve, waiter.reject);
    else ready.push(p);
  };
  server.on('connection', (socket) => {
    if (busy) {
      void routeJoin(socket, sessions, outcomes, options);
      return;
    }
    busy = true;
    void (async () => {
      let opened: Awaited<ReturnType<typeof openIncoming>> | undefined;
      let first: WireFrame;
      try {
        opened = await openIncoming(socket, options);
        first = await opened.channel.next();
      } catch (e) {
        busy = false;
        if (opened) opened.channel.close();
        else socket.destroy();
        return deliver(Promise.reject(refusedBeforeReserving(e)));
      }
      if (first.type === FrameType.Resolve) {
        // not a migration: the answer about an earlier one
        busy = false;
        return answerResolve(opened.channel, first, outcomes);
      }
      deliver(
        serveMigration(opened, first, options, sessions, outcomes).finally(() => {
          busy = false;
        }),
      );
    })();
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

/** A connection while a migration runs: its first frame must be ATTACH naming a live session, or RESOLVE. */
async function routeJoin(socket: net.Socket, sessions: SessionTable, outcomes: OutcomeTable, options: ReceiveOptions): Promise<void> {
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
    if (f.type === FrameType.Resolve) return await answerResolve(ch, f, outcomes);
    if (f.type !== FrameType.Attach) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `a second connection must start with ATTACH or RESOLVE, got ${FrameType[f.type] ?? f.type}`);
    const a = decodeAttach(f.payload);
    const session = sessions.get(a.session);
    if (!session) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'ATTACH names no session running here', { phase: 'attach' });
    session.join(a.role, ch);
  } catch (e) {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_PROTOCOL', (e as Error).message, { phase: 'attach', cause: e });
    await ch.finish(ch.closed ? undefined : encodeError({ code: err.code, message: err.message, phase: 'attach' }, PROTOCOL_VERSION));
  }
}

/**
 * RESOLVE: what became of a session. Not begun to activate: it is fenced now and the answer is
 * not-activated; activating: the answer waits for the result. A session this listener does not
 * know is refused (the source must not guess from that).
 */
async function answerResolve(ch: WireChannel, f: WireFrame, outcomes: OutcomeTable): Promise<void> {
  try {
    const r = decodeResolve(f.payload);
    const outcome = outcomes.get(r.session);
    if (!outcome) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'RESOLVE names no session this receiver knows', { phase: 'resolve' });
    const state = await outcome.resolve();
    trace('receiver', 'session resolved', { outcome: state });
    await ch.finish(encodeResolved({ outcome: state === 'activated' ? 'activated' : 'not-activated' }, PROTOCOL_VERSION));
  } catch (e) {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_PROTOCOL', (e as Error).message, { phase: 'resolve', cause: e });
    await ch.finish(ch.closed ? undefined : encodeError({ code: err.code, message: err.message, phase: 'resolve' }, PROTOCOL_VERSION));
  }
}
