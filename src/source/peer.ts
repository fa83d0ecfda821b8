/** The destination as the source sees it: connecting, and what its ERROR frames mean. */
import net from 'node:net';
import { LivemigError } from '../errors.js';
import type { Frame } from '../protocol/frame.js';
import { decodeError } from '../protocol/messages.js';
import type { MigrateOptions } from './types.js';

/** Errors the destination reported itself: it says it did not (and will not) activate. */
const reportedByPeer = new WeakSet<Error>();

export function isReportedByPeer(e: Error): boolean {
  return reportedByPeer.has(e);
}

/** `e` is the destination's own word (an ERROR, or its answer to RESOLVE): it did not activate. */
export function markReportedByPeer<E extends Error>(e: E): E {
  reportedByPeer.add(e);
  return e;
}

/** The destination's ERROR frame as our error, received in `phase`. */
export function peerError(f: Frame, phase: string): LivemigError {
  try {
    const e = decodeError(f.payload);
    const code =
      e.code === 'ERR_LIVEMIG_NO_MEMORY' || e.code === 'ERR_LIVEMIG_VERSION' || e.code === 'ERR_LIVEMIG_DIGEST' || e.code === 'ERR_LIVEMIG_NOT_LOCAL'
        ? e.code
        : 'ERR_LIVEMIG_REFUSED';
    const err = new LivemigError(code, `destination: ${e.code}: ${e.message}`, { phase });
    reportedByPeer.add(err);
    return err;
  } catch (err) {
    return err as LivemigError;
  }
}

export async function connect(to: MigrateOptions['to']): Promise<net.Socket> {
  if (to instanceof net.Socket) return to;
  return new Promise((resolve, reject) => {
    const s = net.connect({ host: to.host, port: to.port });
    s.once('connect', () => resolve(s));
    s.once('error', (e) =>
      reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot connect to ${to.host}:${to.port}: ${e.message}`, { phase: 'connect', cause: e })),
    );
  });
}
