/**
 * Encodes and decodes, once, every control message that passes inside the pause, so that the
 * first real one does not compile msgpack's and Buffer's paths there (see src/warmup.ts).
 */
import { encodeFrame } from './frame.js';
import { FrameType, HEADER_BYTES } from './format.js';
import {
  decodeAbort,
  decodeActivated,
  decodeCommit,
  decodeCommitAck,
  decodeError,
  decodeRoundEnd,
  encodeAbort,
  encodeActivate,
  encodeActivated,
  encodeCommit,
  encodeCommitAck,
  encodeDeviceState,
  encodeError,
  encodeRoundEnd,
} from './messages.js';

export function warmUpProtocol(version: number): void {
  const payload = (frame: Buffer): Buffer => frame.subarray(HEADER_BYTES);
  decodeCommit(payload(encodeCommit({ digest: 0x0123456789abcdefn, pageCount: 1, activate: true }, version)));
  decodeCommitAck(payload(encodeCommitAck({ digest: 1n }, version)));
  decodeActivated(payload(encodeActivated({ activateMs: 0.5 }, version)));
  encodeActivate(version);
  decodeRoundEnd(payload(encodeRoundEnd({ round: 1, pages: 1 }, version)));
  decodeError(payload(encodeError({ code: 'ERR_LIVEMIG_GUEST', message: 'warm-up', phase: 'commit' }, version)));
  decodeAbort(payload(encodeAbort({ reason: 'warm-up' }, version)));
  Buffer.from(payload(encodeDeviceState(new Uint8Array(8), version)));
  encodeFrame(FrameType.Activate, Buffer.alloc(0), version);
}
