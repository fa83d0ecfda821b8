/**
 * How large each frame type's payload may be, so that a header alone cannot make a side
 * allocate (and wait for) more than that frame can need: control messages are small; the
 * device state has its own limit; bitmaps and hash tables follow the region's page count;
 * page frames keep the protocol maximum (their own rules bound them, native/wire/format.cc).
 * The native reader also grows a payload's buffer as its bytes arrive.
 */
import { MAX_MESSAGE_BODY } from '../guest/contract.js';
import { FrameType, MAX_FRAME_TYPE, MAX_PAYLOAD } from './format.js';

/** a msgpack control message: a few fields, an error's message */
export const CONTROL_MAX = 64 * 1024;
/**
 * the device state's default limit (an integrator's blob; its own option may lower it): one
 * frame, and one message to the destination's guest
 */
export const DEVICE_STATE_MAX = Math.min(MAX_PAYLOAD, MAX_MESSAGE_BODY);

export function frameLimits(o: { pageCount?: number; maxDeviceStateBytes?: number } = {}): Uint32Array {
  const l = new Uint32Array(MAX_FRAME_TYPE + 1).fill(CONTROL_MAX);
  const cap = (n: number): number => Math.min(MAX_PAYLOAD, Math.ceil(n));
  l[FrameType.Pages] = MAX_PAYLOAD;
  l[FrameType.PagesEnc] = MAX_PAYLOAD;
  l[FrameType.DeviceState] = cap(o.maxDeviceStateBytes ?? DEVICE_STATE_MAX);
  if (o.pageCount !== undefined) {
    // a bitmap or a hash table of the region, and the message around it
    l[FrameType.ImageHashes] = cap(o.pageCount * 8 + 64);
    l[FrameType.Postcopy] = cap(o.pageCount / 8 + 64);
    l[FrameType.Attached] = cap(o.pageCount / 8 + 64);
  }
  return l;
}
