/**
 * The API's error table: each LivemigError code to its HTTP status. Every error body is
 * { error: { code, message, phase } } with a stable ERR_LIVEMIG_* code.
 */
import type { ErrorCode } from '../../errors.js';

export const HTTP_STATUS: Partial<Record<ErrorCode, number>> = {
  ERR_LIVEMIG_INVALID_ARGUMENT: 400,
  ERR_LIVEMIG_INSECURE: 400,
  ERR_LIVEMIG_UNAUTHORIZED: 401,
  ERR_LIVEMIG_NOT_FOUND: 404,
  ERR_LIVEMIG_CONFLICT: 409,
  ERR_LIVEMIG_STATE: 409,
  ERR_LIVEMIG_NO_MEMORY: 409,
  ERR_LIVEMIG_REFUSED: 409,
  ERR_LIVEMIG_NOT_LOCAL: 409,
  ERR_LIVEMIG_VERSION: 409,
  ERR_LIVEMIG_UNSUPPORTED: 409,
  ERR_LIVEMIG_CANCELLED: 409,
  // a QEMU VM livemig cannot take as it runs (its RAM not a shared file, QMP not answering): the VM's state, not the request
  ERR_LIVEMIG_QEMU: 409,
  ERR_LIVEMIG_AUTH: 502,
  ERR_LIVEMIG_CONNECTION: 502,
  ERR_LIVEMIG_PROTOCOL: 502,
  ERR_LIVEMIG_TIMEOUT: 504,
  ERR_LIVEMIG_SHUTTING_DOWN: 503,
};

export function statusOf(code: string): number {
  return HTTP_STATUS[code as ErrorCode] ?? 500;
}
