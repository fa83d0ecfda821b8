/**
 * The destination side of a migration, as stages (one file each, sharing a ReceiverContext):
 *   handshake and reservation -> rounds -> device state -> commit -> activation
 *                                                       \-> post-copy
 * and discard for any failure. Nothing is activated before a matching commitment digest and the
 * sender's ACTIVATE; any failure before that discards the region. Every frame is checked
 * before it is used.
 */
import type net from 'node:net';
import type { LivemigError } from '../errors.js';
import { admit, type Admitted } from './admit.js';
import { AUTH_TIMEOUT_MS, ReceiverContext, type MigrationToServe } from './context.js';
import { discard } from './discard.js';
import { refusedBeforeReserving } from './failures.js';
import { checkHello, reserve } from './handshake.js';
import { OutcomeTable } from './outcomes.js';
import type { PendingTicket } from './pending.js';
import { receiveUntilRunning } from './rounds.js';
import { SessionTable } from './session.js';
import type { ReceiveOptions, ReceiveReport } from './types.js';

export type { ReceiveOptions, ReceiveProgress, ReceiveReport, ReceiverState } from './types.js';
export type { MigrationToServe } from './context.js';
export { isRefusedBeforeReserving, mayBeAskedAbout, refusedBeforeReserving } from './failures.js';

/**
 * Serves one migration on an accepted connection. `sessions` is where a listener routes the
 * connections that join a post-copy session (without one, nobody can join: no post-copy).
 */
export async function receiveOn(
  socket: net.Socket,
  options: ReceiveOptions,
  sessions = new SessionTable(),
  outcomes = new OutcomeTable(),
): Promise<ReceiveReport> {
  const admitted = await admitIncoming(socket, options).catch((e: unknown) => Promise.reject(refusedBeforeReserving(e)));
  return serveMigration({ admitted, options, sessions, outcomes });
}

/** An accepted connection, authenticated (nothing is reserved for a source that cannot authenticate), with its first frame. */
export async function admitIncoming(
  socket: net.Socket,
  options: ReceiveOptions,
  timeoutMs = options.authTimeoutMs ?? AUTH_TIMEOUT_MS,
  ticket?: PendingTicket,
): Promise<Admitted> {
  const a = await admit(socket, options.credentials, timeoutMs, ticket);
  a.conn.setIdleTimeout(options.idleTimeoutMs ?? 60_000); // a peer silent this long is gone
  return a;
}

/** Serves one migration whose first frame (`m.admitted.first`, which must be HELLO) has been read. */
export async function serveMigration(m: MigrationToServe): Promise<ReceiveReport> {
  const ctx = new ReceiverContext(m);
  const abort = (reason: LivemigError): boolean => ctx.abortBeforeDeviceState(reason);
  m.abortable?.add(abort);
  try {
    const hello = checkHello(ctx, m.admitted.first);
    const accepted = await reserve(ctx, hello);
    return await receiveUntilRunning(ctx, accepted);
  } catch (e) {
    throw await discard(ctx, e);
  } finally {
    m.abortable?.delete(abort);
    ctx.endSession();
  }
}
