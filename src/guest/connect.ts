/** Connecting to a guest's socket, which may not be listening yet (a guest just started), and agreeing on the contract. */
import { statSync } from 'node:fs';
import { LivemigError } from '../errors.js';
import { addon, callAsync, closeFd } from '../native.js';
import { Tag, refused, type AgreedContract } from './contract.js';

const RETRY_MS = 5;

function checkSocketPath(path: string): void {
  if (typeof path !== 'string' || path.length === 0 || path.length > 107) {
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `a guest socket path is 1..107 characters, got ${JSON.stringify(path)}`, { phase: 'handover' });
  }
}

/**
 * A connected descriptor to a guest that is running already (`livemig send --guest PATH`): there
 * is nothing to wait for, so a path where nothing listens fails at once (ERR_LIVEMIG_GUEST),
 * saying whether the socket does not exist, is not a socket, or was left by a guest that is gone.
 */
export function connectRunningGuest(path: string): number {
  checkSocketPath(path);
  try {
    return addon.unixConnect(path);
  } catch (e) {
    const errno = (e as { errnoName?: string }).errnoName;
    const fail = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_GUEST', `no guest at ${path}: ${why}`, { phase: 'handover', cause: e });
    if (errno === 'ENOENT') throw fail('the socket does not exist (is the guest running? `livemig guest --socket PATH` serves one)');
    if (errno === 'ECONNREFUSED') {
      // an abstract name (@…) is no file to look at
      const isSocket = path.startsWith('@') || statSync(path, { throwIfNoEntry: false })?.isSocket() === true;
      throw fail(isSocket ? 'nothing listens there (ECONNREFUSED): the guest that made the socket has gone' : 'it is not a socket');
    }
    throw new LivemigError('ERR_LIVEMIG_HANDOVER', `connecting to the guest at ${path}: ${(e as Error).message}`, { phase: 'handover', cause: e });
  }
}

/** A connected descriptor, once the guest at `path` accepts; ERR_LIVEMIG_TIMEOUT after `timeoutMs`. */
export async function connectWhenListening(path: string, timeoutMs: number, child?: { exitCode: number | null; signalCode: string | null }): Promise<number> {
  checkSocketPath(path);
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
        throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest exited (${String(child.exitCode ?? child.signalCode)}) before it listened at ${path}`, {
          phase: 'handover',
        });
      }
      if (Date.now() >= until) {
        throw new LivemigError('ERR_LIVEMIG_TIMEOUT', `no guest listened at ${path} within ${timeoutMs} ms (${errno})`, { phase: 'handover', cause: e });
      }
      await new Promise((r) => setTimeout(r, RETRY_MS));
    }
  }
}

/**
 * Tells the guest which contract version the session speaks when it is newer than the one its
 * hello spoke (the guest offered it); a guest that will not speak it is refused. Nothing is
 * sent to a guest that offered nothing newer: a guest of the version before knows no 'V'.
 */
export async function agreeContract(fd: number, hello: AgreedContract, timeoutMs: number): Promise<void> {
  if (hello.contract === hello.helloContract) return;
  const version = Buffer.alloc(4);
  version.writeUInt32LE(hello.contract);
  try {
    addon.controlSend(fd, Tag.contract, version);
  } catch (e) {
    throw new LivemigError('ERR_LIVEMIG_HANDOVER', `telling the guest the contract version failed: ${(e as Error).message}`, { phase: 'handover', cause: e });
  }
  const what = 'waiting for the guest to agree on the contract';
  const r = await callAsync('ERR_LIVEMIG_HANDOVER', 'handover', what, () => addon.controlReceiveAsync(fd, timeoutMs));
  for (const f of r.fds) closeFd(f, 'handover');
  if (r.tag === Tag.contractAgreed) return;
  const why = r.tag === Tag.error ? r.body.toString('utf8', 0, 300) : `it answered 0x${r.tag.toString(16)}`;
  throw refused(`the guest would not speak contract ${hello.contract}: ${why}`);
}
