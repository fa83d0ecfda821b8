/**
 * Frame headers as the TypeScript side writes them (layout: format.ts). Control frames are
 * built here; page frames are built natively (native/wire/format.h writes the same header).
 */
import { ProtocolError } from './errors.js';
import { FLAGS_NONE, HEADER_BYTES, MAGIC, MAX_PAYLOAD, PROTOCOL_VERSION, type FrameType } from './format.js';

export interface Frame {
  version: number;
  type: FrameType;
  flags: number;
  payload: Buffer;
}

/** How encodeHeader writes: the version and flags (PROTOCOL_VERSION, none), and into what (a new buffer). */
export interface HeaderOptions {
  version?: number;
  flags?: number;
  /** written at its start */
  into?: Buffer;
}

/** The one header writer on this side. */
export function encodeHeader(type: FrameType, payloadLength: number, o: HeaderOptions = {}): Buffer {
  const { version = PROTOCOL_VERSION, flags = FLAGS_NONE, into } = o;
  if (payloadLength > MAX_PAYLOAD)
    throw new ProtocolError('ERR_LIVEMIG_FRAME_TOO_LARGE', `refusing to send a ${payloadLength}-byte frame (max ${MAX_PAYLOAD})`);
  const h = into ?? Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt16LE(MAGIC, 0);
  h.writeUInt8(version, 2);
  h.writeUInt8(type, 3);
  h.writeUInt16LE(flags, 4);
  h.writeUInt16LE(0, 6);
  h.writeUInt32LE(payloadLength, 8);
  return h;
}

export function encodeFrame(type: FrameType, payload: Buffer, version = PROTOCOL_VERSION, flags = FLAGS_NONE): Buffer {
  const out = Buffer.allocUnsafe(HEADER_BYTES + payload.length);
  encodeHeader(type, payload.length, { version, flags, into: out });
  payload.copy(out, HEADER_BYTES);
  return out;
}
