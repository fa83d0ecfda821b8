/**
 * The destination's listener: one migration at a time on a port, or several (a daemon's, each
 * with callbacks of its own: ListenOptions). Every connection is
 * authenticated and its first frame read (src/receiver/admit.ts) before anything else: a HELLO
 * takes the migration's slot (or is refused while one runs), an ATTACH joins a post-copy
 * session, a RESOLVE asks what became of one. Connections that have not sent their first frame
 * are capped, overall and per address.
 */
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { FrameType, MAX_CHANNELS, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeAttach, decodeResolve, encodeError, encodeResolved } from '../protocol/messages.js';
import type { FramedConnection } from '../protocol/connection.js';
import type { WireFrame } from '../protocol/wire.js';
import { refusalOf, markRefusal, type Refusal } from '../refusals.js';
import { assertSecureEnough } from '../security/tls.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import { OutcomeTable } from './outcomes.js';
import { PendingConnections } from './pending.js';
import { admitIncoming, isRefusedBeforeReserving, refusedBeforeReserving, serveMigration } from './receiver.js';
import { SessionTable } from './session.js';
import type { ReceiveOptions, ReceiveReport } from './types.js';

/** How long a joining connection has to send its ATTACH. */
const ATTACH_WAIT_MS = 5_000;
/**
 * Connections that have not sent their first frame yet (src/receiver/pending.ts): unproven ones
 * overall and from one address, proven ones, and how long a new one has before a cap may let it go.
 */
const PENDING_LIMITS = { max: 64, maxPerAddress: 16, maxProven: 64, graceMs: 250 } as const;
/** refusals kept for next() until someone asks; later ones are only traced */
const MAX_QUEUED_REFUSALS = 64;

export interface Receiver {
  readonly port: number;
  readonly address: string;
  /** the next migration's outcome */
  next(): Promise<ReceiveReport>;
  /**
   * From now on a HELLO is refused (this listener is done migrating); RESOLVE is still
   * answered, so a source that lost the link after its commitment can learn the outcome.
   */
  refuseMigrations(): void;
  /**
   * Aborts the running migrations whose sources have not paused their guests yet (no device
   * state has come); returns how many. The others (inside their pause, committed, in
   * post-copy) run to their end.
   */
  abortUnpaused(reason: LivemigError): number;
  /** Resolves true once a RESOLVE has been answered (from now on), false after `ms`. */
  nextResolve(ms: number): Promise<boolean>;
  close(): Promise<void>;
}

/** How a listener that serves several migrations at once hands each one out. */
export interface ListenOptions {
  /** migrations served at once (default 1); a HELLO beyond them is refused (ERR_LIVEMIG_REFUSED, "busy") */
  maxConcurrent?: number;
  /**
   * Called for each HELLO that takes a slot: the callbacks for this migration alone (the
   * listener's own options give the authentication settings), and where its outcome goes; with
   * it, next() sees only the refusals (and none with onRefused).
   */
  perMigration?(): { options: ReceiveOptions; settled(outcome: Promise<ReceiveReport>): void; refused?(r: Refusal): void };
  /**
   * Every refusal here (authentication, a bad first frame, busy, and HELLOs refused before
   * anything was reserved; not connections let go as a crowd's: src/receiver/pending.ts), as it
   * happens. With it, next() is not handed the refusals of connections (a migration refused at
   * its HELLO still settles its own outcome); a HELLO's refusal goes to its perMigration()'s
   * `refused` when it has one.
   */
  onRefused?(r: Refusal): void;
}

/** Listens and serves migrations, one at a time unless `listenOptions` says otherwise. */
export async function listen(host: string, port: number, options: ReceiveOptions, listenOptions: ListenOptions = {}): Promise<Receiver> {
  const maxConcurrent = listenOptions.maxConcurrent ?? 1;
  if (!Number.isInteger(maxConcurrent) || maxConcurrent < 1)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `maxConcurrent must be a positive integer, got ${maxConcurrent}`, { phase: 'listen' });
  const mc = options.maxChannels;
  if (mc !== undefined && (!Number.isInteger(mc) || mc < 1 || mc > MAX_CHANNELS))
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `maxChannels must be an integer from 1 to ${MAX_CHANNELS}, got ${String(mc)}`, { phase: 'listen' });
  assertSecureEnough(host, options.credentials, options.insecure, 'listening on');
  // pauseOnConnect: Node must not read from the connection before the native wire owns it
  const server = net.createServer({ noDelay: true, pauseOnConnect: true });
  const results: { resolve: (r: ReceiveReport) => void; reject: (e: unknown) => void }[] = [];
  const ready: Promise<ReceiveReport>[] = [];
  let running = 0;
  let done = false;
  const sessions = new SessionTable();
  const abortable = new Set<(reason: LivemigError) => boolean>();
  const outcomes = new OutcomeTable();
  const resolveWaiters: ((answered: boolean) => void)[] = [];
  const deliver = (p: Promise<ReceiveReport>): void => {
    p.catch(() => undefined); // handed to whoever calls next()
    const waiter = results.shift();
    if (waiter) p.then(waiter.resolve, waiter.reject);
    else ready.push(p);
  };
  const pending = new PendingConnections(PENDING_LIMITS);
  const report = (r: Refusal, to = listenOptions.onRefused): void => {
    trace('receiver', ReceiverEvent.connectionRefused, { ...r });
    to?.(r);
  };
  server.on('connection', (socket) => {
    const ticket = pending.add(socket);
    // read now: a destroyed socket no longer knows its peer
    const from = `${socket.remoteAddress ?? ''}:${socket.remotePort ?? 0}`;
    void (async () => {
      let a: Awaited<ReturnType<typeof admitIncoming>>;
      try {
        // joining connections (ATTACH) have less time than a migration's first connection
        a = await admitIncoming(socket, options, running > 0 ? (options.authTimeoutMs ?? ATTACH_WAIT_MS) : undefined, ticket);
      } catch (e) {
        ticket.settle();
        socket.destroy();
        // every refusal is reported; next() is handed it only when nobody else hears refusals and
        // no migration runs (its next() is not for a stranger's failure), and only up to a bound
        // of refusals nobody has asked for yet (a scan is endless)
        if (ticket.evicted) return;
        report(refusalOf(e, from));
        if (!listenOptions.onRefused && running === 0 && ready.length < MAX_QUEUED_REFUSALS) deliver(Promise.reject(refusedBeforeReserving(e)));
        return;
      }
      ticket.settle();
      const { first } = a;
      if (first.type === FrameType.Resolve) {
        if (await answerResolve(a.conn, first, outcomes)) for (const w of resolveWaiters.splice(0)) w(true);
        return;
      }
      if (first.type === FrameType.Attach) return joinSession(a.conn, first, sessions);
      // the slot is taken by a HELLO that arrived whole, not by whoever connected first
      const full = noSlot(running, maxConcurrent, done);
      if (full) {
        report({ ...refusalOf(full, a.remote), ...peerOf(a.security.peer) });
        return void a.conn.finish(encodeError({ code: full.code, message: full.message, phase: 'handshake' }, PROTOCOL_VERSION));
      }
      running++;
      const own = listenOptions.perMigration?.();
      const migrationOptions = own ? { ...options, ...own.options } : options;
      const outcome = serveMigration({ admitted: a, options: migrationOptions, sessions, outcomes, abortable })
        .catch((e: unknown) => {
          // before its owner hears the outcome: a refused HELLO is reported first
          if (isRefusedBeforeReserving(e)) report({ ...refusalOf(e, a.remote), ...peerOf(a.security.peer) }, own?.refused ?? listenOptions.onRefused);
          throw e;
        })
        .finally(() => {
          running--;
        });
      if (own) own.settled(outcome);
      else deliver(outcome);
    })();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (e) =>
      reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot listen on ${host}:${port}: ${e.message}`, { phase: 'listen', cause: e })),
    );
    server.listen(port, host, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  return {
    port: addr.port,
    address: addr.address,
    next: () => ready.shift() ?? new Promise((resolve, reject) => results.push({ resolve, reject })),
    refuseMigrations: () => void (done = true),
    abortUnpaused: (reason) => [...abortable].filter((abort) => abort(reason)).length,
    nextResolve: (ms) =>
      new Promise((resolve) => {
        const t = setTimeout(() => {
          const i = resolveWaiters.indexOf(w);
          if (i >= 0) resolveWaiters.splice(i, 1);
          resolve(false);
        }, ms);
        const w = (answered: boolean): void => (clearTimeout(t), resolve(answered));
        resolveWaiters.push(w);
      }),
    close: () =>
      new Promise((resolve) => {
        pending.close();
        server.close(() => resolve());
      }),
  };
}

/** A HELLO that finds no slot free: why (busy, or this receiver takes no more), marked as that refusal. */
function noSlot(running: number, maxConcurrent: number, done: boolean): LivemigError | undefined {
  if (running < maxConcurrent && !done) return undefined;
  const why = done
    ? 'this receiver takes no more migrations'
    : maxConcurrent === 1
      ? 'a migration is already running here'
      : `busy: ${running} migrations are running here, the most it takes at once`;
  return markRefusal(new LivemigError('ERR_LIVEMIG_REFUSED', why, { phase: 'handshake' }), done ? 'closing' : 'busy');
}

/** An authenticated source's name, for its refusal. */
const peerOf = (peer: string | null): { peer?: string } => (peer ? { peer } : {});

/** ATTACH: the connection joins the session it names (post-copy, or an extra channel). */
async function joinSession(conn: FramedConnection, f: WireFrame, sessions: SessionTable): Promise<void> {
  try {
    const a = decodeAttach(f.payload);
    const session = sessions.get(a.session);
    if (!session) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'ATTACH names no session running here', { phase: 'attach' });
    if (a.role === 'channel' && a.channel! >= session.channels)
      throw new LivemigError(
        'ERR_LIVEMIG_PROTOCOL',
        `ATTACH channel ${a.channel}: this session was granted ${session.channels} channels (0..${session.channels - 1})`,
        { phase: 'attach' },
      );
    session.join(a.role === 'channel' ? `channel-${a.channel!}` : a.role, conn);
  } catch (e) {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_PROTOCOL', (e as Error).message, { phase: 'attach', cause: e });
    await conn.finish(conn.closed ? undefined : encodeError({ code: err.code, message: err.message, phase: 'attach' }, PROTOCOL_VERSION));
  }
}

/**
 * RESOLVE: what became of a session. Not begun to activate: it is fenced now and the answer is
 * not-activated; activating: the answer waits for the result. A session this listener does not
 * know is refused (the source must not guess from that).
 */
async function answerResolve(conn: FramedConnection, f: WireFrame, outcomes: OutcomeTable): Promise<boolean> {
  try {
    const r = decodeResolve(f.payload);
    const outcome = outcomes.get(r.session);
    if (!outcome) throw new LivemigError('ERR_LIVEMIG_REFUSED', 'RESOLVE names no session this receiver knows', { phase: 'resolve' });
    const state = await outcome.resolve();
    trace('receiver', ReceiverEvent.sessionResolved, { outcome: state });
    await conn.answerFirst(encodeResolved({ outcome: state === 'activated' ? 'activated' : 'not-activated' }, PROTOCOL_VERSION));
    await conn.finish();
    return true;
  } catch (e) {
    const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_PROTOCOL', (e as Error).message, { phase: 'resolve', cause: e });
    await conn.finish(conn.closed ? undefined : encodeError({ code: err.code, message: err.message, phase: 'resolve' }, PROTOCOL_VERSION));
    return false;
  }
}
