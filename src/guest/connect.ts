/** Connecting to a guest's socket, which may not be listening yet (a guest just started). */
import { LivemigError } from '../errors.js';
import { addon } from '../native.js';

const RETRY_MS = 5;

/** A connected descriptor, once the guest at `path` accepts; ERR_LIVEMIG_TIMEOUT after `timeoutMs`. */
export async function connectWhenListening(path: string, timeoutMs: number, child?: { exitCode: number | null; signalCode: string | null }): Promise<number> {
  if (typeof path !== 'string' || path.length === 0 || path.length > 107) {
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `a guest socket path is 1..107 characters, got ${JSON.stringify(path)}`, { phase: 'handover' });
  }
  const until = Date.now() + timeoutMs;
  for (;;) {
    try {
      return addon.unixConnect(path);
    } catch (e) {
      const errno = (e as { errnoName?: string }).errnoName;
      // nobody listens there yet: the guest is starting (or the path is wrong: the deadline says so)
      if (errno !== 'ENOENT' && errno !== 'ECONNREFUSED') {
        throw new LivemigError('ERR_LIVEMIG_HANDOVER', `connecting to the guest at ${path}: ${(e as Error).message}`, { phase: 'handover', cause: e });
      }
      if (child && (child.exitCode !== null || child.signalCode !== null)) {
        throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest exited (${String(child.exitCode ?? child.signalCode)}) before it listened at ${path}`, { phase: 'handover' });
      }
      if (Date.now() >= until) {
        throw new LivemigError('ERR_LIVEMIG_TIMEOUT', `no guest listened at ${path} within ${timeoutMs} ms (${errno})`, { phase: 'handover', cause: e });
      }
      await new Promise((r) => setTimeout(r, RETRY_MS));
    }
  }
}
