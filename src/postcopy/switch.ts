/**
 * The source's switch to post-copy: with the guest paused, the device state and the list of
 * pages the destination lacks go, the destination resumes the guest at once (the point of
 * commitment is sending POSTCOPY), and the pages follow: on request on the priority
 * connection, pushed in the background on the main one.
 */
import { trace } from '../trace.js';
import { SourceEvent } from '../trace-events.js';
import { LivemigError } from '../errors.js';
import { addon, callAsync, digestOf } from '../native.js';
import { extentMap } from '../pages/extents.js';
import { FrameType } from '../protocol/format.js';
import type { Frame } from '../protocol/frame.js';
import { bitmapToBytes, bytesToBitmap, decodeAttached, decodePostcopyRunning, encodeAttach, encodePostcopy, type AttachRole } from '../protocol/messages.js';
import { FramedConnection } from '../protocol/connection.js';
import type { Region } from '../region/region.js';
import type { PageServer, Connections, PushPacer } from './source.js';
import type { PostcopyStats } from '../source/types.js';

export interface PostcopyLink {
  /** opens a new connection to the destination, authenticated as the first one was */
  connect(): Promise<FramedConnection>;
  session: string;
  version: number;
}

/** A connection joining the session as `role`. */
export async function attachConnection(link: PostcopyLink, role: AttachRole): Promise<FramedConnection> {
  const conn = await link.connect();
  try {
    await conn.send(encodeAttach({ session: link.session, role }, link.version));
  } catch (e) {
    conn.close();
    throw e;
  }
  return conn;
}

/** After a break: both connections again, and what the destination holds. Retries until `timeoutMs`. */
export async function reconnect(link: PostcopyLink, region: Region, timeoutMs: number, peerError: (f: Frame) => Error): Promise<Connections> {
  const deadline = performance.now() + timeoutMs;
  let last: unknown;
  while (performance.now() < deadline) {
    let push: FramedConnection | undefined;
    let prio: FramedConnection | undefined;
    try {
      push = await attachConnection(link, 'push');
      prio = await attachConnection(link, 'prio');
      const held = decodeAttached((await prio.expect(FrameType.Attached, peerError, 5_000)).payload, region.pageCount).held;
      const p = push;
      const q = prio;
      return { push: push.handle, prio: prio.handle, held: bitmapToBytes(held, region.pageCount), close: () => (p.handOff(), q.handOff()) };
    } catch (e) {
      last = e;
      trace('source', SourceEvent.postcopyReconnectFailed, { reason: (e as Error).message });
      push?.close();
      prio?.close();
      // the destination answered that it has no such session: it is gone, retrying cannot help
      if (e instanceof LivemigError && e.code === 'ERR_LIVEMIG_REFUSED') break;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  throw new LivemigError(
    'ERR_LIVEMIG_CONNECTION',
    `post-copy: the destination did not come back within ${timeoutMs} ms (${(last as Error | undefined)?.message ?? 'no attempt'}); the guest runs ` +
      `there and waits for pages that are only here: this source keeps them, paused`,
    { phase: 'postcopy', cause: last },
  );
}

export interface PostcopyResult {
  downtime_end: number;
  /** when the destination had every page (performance.now()), and the digest check after it */
  complete_at: number;
  verify_ms: number;
  activate_ms: number;
  pages_needed: number;
  stats: PostcopyStats;
  digest: bigint;
}

/**
 * Runs the switch and the whole post-copy phase. `onCommitted` is called once POSTCOPY has been
 * sent (from then on the guest must never resume here); `onRunning` when the destination runs it.
 */
export async function runPostcopy(o: {
  /** created before the pause (its tables are allocated there), not attached yet */
  server: PageServer;
  conn: FramedConnection;
  /** the DEVICE_STATE frame: it goes in the same write as POSTCOPY */
  deviceState: Buffer;
  prio: FramedConnection;
  link: PostcopyLink;
  region: Region;
  needed: Uint8Array;
  pagesNeeded: number;
  hashes: BigUint64Array;
  recoverTimeoutMs: number;
  peerError: (f: Frame, phase: string) => Error;
  /** right before POSTCOPY is written (the point of commitment begins: nothing may abort after it) */
  onCommitting?(): void | Promise<void>;
  onCommitted(): void;
  onRunning(activateMs: number): void;
  /** how long POSTCOPY_RUNNING may take before the outcome is asked for (`resolve`) */
  confirmTimeoutMs?: number;
  /**
   * the link was lost (or the destination went silent) after POSTCOPY: returns when the
   * destination, asked on a new connection, says the guest runs there (post-copy then goes on
   * over new connections); throws otherwise
   */
  resolve?(cause: unknown): Promise<void>;
  onProgress?(s: PostcopyStats): void;
  /** the migration's pacer: the background push keeps to its cap */
  pacer?: PushPacer;
}): Promise<PostcopyResult> {
  const { conn, region } = o;
  const server = o.server;
  try {
    // the server answers requests from the first fault on: attach before the switch
    server.attach({ push: conn.handle, prio: o.prio.handle, close: () => o.prio.handOff() });
    const bitmap = bytesToBitmap(o.needed);
    // One write: the destination wakes once for the state and the switch. POSTCOPY is the point
    // of commitment and the write's last bytes: a write that failed did not deliver it whole.
    await o.onCommitting?.();
    await conn.send([o.deviceState, encodePostcopy({ needed: bitmap }, o.link.version)]);
    trace('source', SourceEvent.postcopySent);
    o.onCommitted();
    let running: { activateMs: number };
    try {
      running = decodePostcopyRunning((await conn.expect(FrameType.PostcopyRunning, (f) => o.peerError(f, 'activate'), o.confirmTimeoutMs)).payload);
    } catch (e) {
      if (!o.resolve) throw e;
      await o.resolve(e);
      running = { activateMs: 0 }; // it runs there; its own activation time was lost with the link
    }
    const tRunning = performance.now();
    o.onRunning(running.activateMs);
    const destDigest = await server.run(() => reconnect(o.link, region, o.recoverTimeoutMs, (f) => o.peerError(f, 'postcopy')), o.onProgress, o.pacer);
    const tComplete = performance.now();
    // the source's image (paused, unchanged) is the one the destination must now hold: compare
    // digests; the guest no longer needs this side for pages, so this is outside its time
    // (a hole is not read: it holds zeros, and a read would allocate it on this host)
    const data = extentMap(await region.dataExtents(), region.pageCount);
    await callAsync('ERR_LIVEMIG_SYSCALL', 'postcopy', 'hashing the paused region', () => addon.hashAll(region.nativeHandle, o.hashes, data));
    const digest = digestOf(o.hashes, 'postcopy');
    if (digest !== destDigest) {
      throw new LivemigError(
        'ERR_LIVEMIG_DIGEST',
        `post-copy finished but the destination's image digest ${destDigest.toString(16)} differs from the source's ${digest.toString(16)}; the ` +
          `source keeps its copy, paused`,
        { phase: 'postcopy' },
      );
    }
    return {
      downtime_end: tRunning,
      complete_at: tComplete,
      verify_ms: performance.now() - tComplete,
      activate_ms: running.activateMs,
      pages_needed: o.pagesNeeded,
      stats: server.stats(),
      digest,
    };
  } finally {
    server.close();
    conn.handOff();
  }
}
