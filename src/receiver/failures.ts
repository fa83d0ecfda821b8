/**
 * What a listener needs to know about a failed receive to decide whether to go on: marks set on
 * the error itself (it is rethrown through callers that know nothing of them), read by the
 * listener and by `livemig receive`.
 */
import { LivemigError } from '../errors.js';
import { decodeAbort } from '../protocol/messages.js';

const refusedEarly = new WeakSet<object>();

/**
 * Whether a receive failed before anything was reserved for it (authentication, a first frame
 * that is not a valid HELLO, a peer that went away): a listener that serves migrations one after
 * another goes on listening after such a failure.
 */
export function isRefusedBeforeReserving(e: unknown): boolean {
  return typeof e === 'object' && e !== null && refusedEarly.has(e);
}

/** Marks `e` as a failure before anything was reserved; returns it. */
export function refusedBeforeReserving<E>(e: E): E {
  if (typeof e === 'object' && e !== null) refusedEarly.add(e);
  return e;
}

const askable = new WeakSet<object>();

/**
 * Whether the source may not know how a failed receive ended: it failed after the device
 * state arrived (so COMMIT may have been sent, and lost), and not because the source said so.
 * Such a source asks on a new connection (RESOLVE): a listener should stay up to answer.
 */
export function mayBeAskedAbout(e: unknown): boolean {
  return typeof e === 'object' && e !== null && askable.has(e);
}

/** Marks `e` as a failure the source may ask about (see mayBeAskedAbout). */
export function markMayBeAskedAbout(e: object): void {
  askable.add(e);
}

/**
 * The error an ABORT from the source ends the receive with: ERR_LIVEMIG_CANCELLED when its
 * operator cancelled the migration (the destination records a cancel, not a failure), else
 * ERR_LIVEMIG_ABORTED with the source's reason.
 */
export function sourceAborted(payload: Buffer, phase: string): LivemigError {
  const a = decodeAbort(payload);
  return a.cancelled
    ? new LivemigError('ERR_LIVEMIG_CANCELLED', `cancelled by the source: ${a.reason}`, { phase })
    : new LivemigError('ERR_LIVEMIG_ABORTED', `the source aborted: ${a.reason}`, { phase });
}
