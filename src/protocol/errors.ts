import { LivemigError } from '../errors.js';

export type ProtocolCode = 'ERR_LIVEMIG_PROTOCOL' | 'ERR_LIVEMIG_FRAME_TOO_LARGE' | 'ERR_LIVEMIG_VERSION' | 'ERR_LIVEMIG_PAGE_INDEX';

/** A peer sent something the protocol does not allow. The connection is closed after it. */
export class ProtocolError extends LivemigError {
  constructor(code: ProtocolCode, message: string) {
    super(code, message, { phase: 'protocol' });
  }
}

/** What an operation on a closed connection fails with. */
export function connectionClosed(): LivemigError {
  return new LivemigError('ERR_LIVEMIG_CONNECTION', 'the connection is closed', { phase: 'transport' });
}
