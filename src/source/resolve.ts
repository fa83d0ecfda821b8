/**
 * Resolving a lost commitment (capability `resolve`): the link died after the frame that lets
 * the destination activate went out, so only the destination knows whether the guest runs
 * there. The source reconnects (authenticated like the first connection) and asks with the
 * session's token, again and again until `resolveTimeoutMs`: `activated` (release this copy)
 * or `not-activated` (the destination fenced the session for good: resume here). Without an
 * answer in time the outcome stays unknown and the guest stays paused.
 */
import net from 'node:net';
import { LivemigError } from '../errors.js';
import { CAP_RESOLVE, FrameType, PROTOCOL_VERSION } from '../protocol/format.js';
import { decodeResolved, encodeResolve, type ResolveOutcome } from '../protocol/messages.js';
import { openConnection, type Credentials } from '../security/tls.js';
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import type { SourceContext } from './context.js';
import { connect, isReportedByPeer, markReportedByPeer, peerError } from './peer.js';

const RETRY_MS = 200;
const ANSWER_WAIT_MS = 5_000;

export interface ResolveTarget {
  to: { host: string; port: number };
  session: string;
  credentials?: Credentials;
  handshakeTimeoutMs: number;
}

/** One question on a fresh connection; throws when there is no answer. */
export async function askOutcome(t: ResolveTarget): Promise<ResolveOutcome> {
  const { conn } = await openConnection(await connect(t.to), t.credentials, 'client', t.handshakeTimeoutMs);
  try {
    await conn.send(encodeResolve({ session: t.session }, PROTOCOL_VERSION));
    return decodeResolved((await conn.expect(FrameType.Resolved, (f) => peerError(f, 'resolve'), ANSWER_WAIT_MS)).payload).outcome;
  } finally {
    conn.close();
  }
}

/** Asks until an answer comes or `timeoutMs` passes (then undefined, with the last failure). */
export async function resolveOutcome(t: ResolveTarget, timeoutMs: number): Promise<{ outcome?: ResolveOutcome; last?: unknown; attempts: number }> {
  const deadline = performance.now() + timeoutMs;
  let last: unknown;
  let attempts = 0;
  while (performance.now() < deadline) {
    attempts++;
    try {
      const outcome = await askOutcome(t);
      trace('source', SourceEvent.commitmentResolved, { outcome, attempts });
      return { outcome, attempts };
    } catch (e) {
      last = e;
      // a destination that does not know the session cannot say what happened: keep asking
      // (it may be another process on a restarted port), and report it if nothing better comes
    }
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
  return { last, attempts };
}

/** How an operator resolves it later, by hand. */
export function resolveCommand(to: { host: string; port: number } | net.Socket, session: string): string {
  const where = to instanceof net.Socket ? 'HOST:PORT' : `${to.host.includes(':') ? `[${to.host}]` : to.host}:${to.port}`;
  return `livemig resolve --to ${where} --session ${session} [the same credentials flags]`;
}

export const unknownOutcome = (message: string, cause: unknown): LivemigError =>
  new LivemigError('ERR_LIVEMIG_ACTIVATION_UNKNOWN', message, { phase: 'activate', cause });

/**
 * After the point of commitment the link was lost before `awaited` (ACTIVATED, POSTCOPY_RUNNING)
 * came: returns when the destination, asked, says the guest runs there; throws when it says it
 * did not (marked as the peer's word: the rollback resumes the guest here), or when it cannot
 * be asked within the resolve timeout (ERR_LIVEMIG_ACTIVATION_UNKNOWN: the guest stays paused).
 */
export async function resolveLostCommitment(ctx: SourceContext, e: unknown, awaited: string): Promise<void> {
  if (e instanceof Error && isReportedByPeer(e)) throw e;
  const { accept, conn } = ctx.session;
  const to = ctx.settings.options.to;
  if (!accept.capabilities.includes(CAP_RESOLVE) || !accept.session || to instanceof net.Socket) throw e;
  const session = accept.session;
  conn.close();
  trace('source', SourceEvent.commitmentUnconfirmed, { reason: (e as Error).message });
  const { credentials } = ctx.settings.options;
  const r = await resolveOutcome(
    { to, session, ...(credentials ? { credentials } : {}), handshakeTimeoutMs: ctx.settings.handshakeTimeoutMs },
    ctx.settings.resolveTimeoutMs,
  );
  if (r.outcome === 'activated') return;
  if (r.outcome === 'not-activated') {
    throw markReportedByPeer(
      new LivemigError(
        'ERR_LIVEMIG_CONNECTION',
        `the link was lost after the commitment (${(e as Error).message}); asked again, the destination says it did not activate and has fenced the ` +
          `session: the guest resumes here`,
        { phase: 'activate', cause: e },
      ),
    );
  }
  throw unknownOutcome(
    `the commitment was sent but ${awaited} did not come (${(e as Error).message}), and the destination could not be asked within ` +
      `${ctx.settings.resolveTimeoutMs} ms (${r.attempts} attempts; last: ${(r.last as Error | undefined)?.message ?? 'none'}): the source guest ` +
      `stays paused and is not released. Resolve it with: ${resolveCommand(to, session)}`,
    e,
  );
}
