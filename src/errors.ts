/**
 * One error class for every livemig failure. `code` is stable and documented below; `phase`
 * says which stage of a migration (or which subsystem) failed; `syscall`/`errno` are set when
 * the kernel refused something.
 */
export const ErrorCodes = {
  ERR_LIVEMIG_INVALID_ARGUMENT: 'an argument has the wrong type, range or alignment',
  ERR_LIVEMIG_RELEASED: 'the region or tracker was used after release()/stop()',
  ERR_LIVEMIG_NO_MEMORY: 'memory for the region could not be created, reserved or mapped',
  ERR_LIVEMIG_SYSCALL: 'a system call failed; see syscall and errno',
  ERR_LIVEMIG_UNSUPPORTED: 'the kernel (or this version of livemig) lacks a feature this operation needs',
  ERR_LIVEMIG_STALLED: 'pre-copy did not converge and the stall policy gave up; the source guest keeps running',
  ERR_LIVEMIG_DEADLINE: 'the migration could not finish before its deadline; the source guest keeps running',
  ERR_LIVEMIG_TRACKING: 'dirty-page tracking could not start or collect',
  ERR_LIVEMIG_STATE: 'the operation is not valid in the current state',
  ERR_LIVEMIG_HANDOVER: 'a guest process could not hand over its region',
  ERR_LIVEMIG_TIMEOUT: 'a peer did not answer in time',
  ERR_LIVEMIG_PROTOCOL: 'the peer sent a frame or message the protocol does not allow',
  ERR_LIVEMIG_FRAME_TOO_LARGE: 'a frame announced a payload larger than the protocol maximum',
  ERR_LIVEMIG_VERSION: 'the peers share no protocol version',
  ERR_LIVEMIG_PAGE_INDEX: 'a page index or count from the peer is outside the region',
  ERR_LIVEMIG_REFUSED: 'the destination refused the migration (see the cause it gave)',
  ERR_LIVEMIG_CONNECTION: 'the connection to the peer failed or closed early',
  ERR_LIVEMIG_DIGEST: 'the destination image does not match the source (commitment digest differs)',
  ERR_LIVEMIG_ABORTED: 'the migration was aborted; the source guest keeps running',
  ERR_LIVEMIG_CANCELLED: 'the migration was cancelled before its point of commitment; the source guest keeps running',
  ERR_LIVEMIG_GUEST: 'the guest (pause/resume/device state callbacks) failed',
  ERR_LIVEMIG_QEMU: "QEMU refused a request, failed, or runs a VM livemig cannot move (the message carries QEMU's own words)",
  ERR_LIVEMIG_SOURCE_LOST:
    'post-copy: the link to the source did not come back in time; the destination guest cannot finish (pages it lacks exist only at the source)',
  ERR_LIVEMIG_INSECURE: 'off loopback without credentials, and --insecure (insecure: true) was not given',
  ERR_LIVEMIG_AUTH: 'a peer, or a record of an encrypted stream, failed authentication',
  ERR_LIVEMIG_NOT_LOCAL: 'a same-host upgrade (--local) was asked of a destination on another host (or another filesystem); the source guest keeps running',
  ERR_LIVEMIG_NOT_FOUND: 'the daemon knows no guest or migration by that name or id',
  ERR_LIVEMIG_CONFLICT: 'the guest is already being migrated, or a guest of that name is already registered',
  ERR_LIVEMIG_UNAUTHORIZED: "the daemon's API needs a bearer token (--token-file) and the request had none or another",
  ERR_LIVEMIG_INTERNAL: 'a bug in livemig: the message says where; please report it',
  ERR_LIVEMIG_SHUTTING_DOWN: 'the daemon is shutting down: it takes no new migration',
  ERR_LIVEMIG_ACTIVATION_UNKNOWN: 'committed, but activation on the destination was not confirmed: the source stays paused, not released',
  ERR_LIVEMIG_HISTORY: "the daemon's migration history (its --state-dir file) could not be created, opened, read or written",
  ERR_LIVEMIG_DAEMON_STOPPED:
    'the daemon stopped while the migration ran (a crash, or a kill): its next start found it unfinished in the history, and its outcome is not known there',
} as const;

export type ErrorCode = keyof typeof ErrorCodes;

export interface LivemigErrorOptions {
  phase?: string;
  syscall?: string;
  errno?: number;
  errnoName?: string;
  cause?: unknown;
}

export class LivemigError extends Error {
  readonly code: ErrorCode;
  readonly phase: string | undefined;
  readonly syscall: string | undefined;
  readonly errno: number | undefined;
  readonly errnoName: string | undefined;

  constructor(code: ErrorCode, message: string, options: LivemigErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'LivemigError';
    this.code = code;
    this.phase = options.phase;
    this.syscall = options.syscall;
    this.errno = options.errno;
    this.errnoName = options.errnoName;
  }
}

export function invalidArgument(message: string): LivemigError {
  return new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', message, { phase: 'validate' });
}
