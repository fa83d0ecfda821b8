/**
 * Stage 3, stop-and-copy as the destination sees it: the source paused its guest and sent the
 * last pages, then DEVICE_STATE. The guest starts loading it at once (prepare), and the
 * commitment digest is computed while COMMIT is on its way; from version 3 this side sends its
 * digest first, as proof that it holds the image.
 */
import { digestOf } from '../native.js';
import { ProtocolError } from '../protocol/errors.js';
import { FLAG_PROVE } from '../protocol/format.js';
import { encodeDigest } from '../protocol/messages.js';
import type { WireFrame } from '../protocol/wire.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import type { Accepted, Received, ReceiverContext } from './context.js';

export async function takeDeviceState(ctx: ReceiverContext, f: WireFrame, a: Accepted, got: Received): Promise<void> {
  const { version } = ctx;
  if (ctx.stage !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'DEVICE_STATE after COMMIT');
  // once: the state the guest prepared with is the state it activates with
  if (got.deviceState !== undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'a second DEVICE_STATE');
  if (ctx.channels && !got.channelsEnded) {
    throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'DEVICE_STATE before the extra channels ended (ROUND_END last on this connection)');
  }
  const prove = (f.flags & FLAG_PROVE) !== 0;
  if (f.flags & ~FLAG_PROVE || (prove && version < 3)) {
    throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `DEVICE_STATE with flags 0x${f.flags.toString(16)}, which version ${version} does not define`);
  }
  got.deviceState = f.payload; // the native reader's own buffer, made for this frame: no copy
  ctx.deviceStateSeen = true;
  trace('receiver', ReceiverEvent.deviceStateReceived);
  if (ctx.options.prepare && !got.prepared) {
    // without the proof, and post-copy agreed, the state comes with the switch: pages are missing
    got.prepared = ctx.options.prepare(a.memory ?? a.region, got.deviceState, { pagesMissing: a.postcopy && !prove });
    got.prepared.catch(() => undefined); // awaited at COMMIT or POSTCOPY
  }
  // the last pages came before the device state: the digest is known while COMMIT is on its
  // way (post-copy from the start ends with a digest of its own: none is due here)
  if (!a.postcopyPlanned || prove) {
    got.digestAt = got.pages;
    got.digest = digestOf(a.hashes, 'commit');
  }
  trace('receiver', ReceiverEvent.guestPreparing);
  // version 3: the proof that this side holds the image, computed here, before the source
  // says what its digest is (an impostor could only echo it)
  if (prove) await ctx.conn.send(encodeDigest({ digest: got.digest, pageCount: a.region.pageCount }, version));
}
