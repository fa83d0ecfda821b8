/**
 * Stage 3', the destination's post-copy: at POSTCOPY the guest is registered for minor faults
 * and resumed here at once (the point of commitment); its missing pages arrive on the push
 * stream and, for faults, on the priority connection. After a break, both connections join the
 * session again and the source is told what this side holds.
 */
import { LivemigError } from '../errors.js';
import { addon, call, closeFd } from '../native.js';
import { closeDisks, syncDisksFinal, type IncomingDisk } from '../disk/incoming.js';
import type { WatchedImages } from '../disk/watch.js';
import { FaultService } from '../postcopy/dest.js';
import { ProtocolError } from '../protocol/errors.js';
import { bytesToBitmap, decodePostcopy, encodeAttached, encodePostcopyRunning } from '../protocol/messages.js';
import type { FramedConnection } from '../protocol/connection.js';
import type { Region } from '../region/region.js';
import { complement, union, type PageExtents } from '../pages/extents.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import type { Accepted, Received, ReceiverContext } from './context.js';
import type { PostcopySession } from './session.js';
import type { ReceiveOptions, ReceiveProgress, ReceiveReport } from './types.js';

/** How long the priority connection (on its own stream, racing POSTCOPY) may take to join. */
const PRIO_ATTACH_WAIT_MS = 5_000;

interface PostcopyStart {
  conn: FramedConnection;
  payload: Buffer;
  region: Region;
  hashes: BigUint64Array;
  deviceState: Buffer;
  version: number;
  session: PostcopySession;
  options: ReceiveOptions & Required<Pick<ReceiveOptions, 'postcopy'>>;
  progress(e: ReceiveProgress): void;
  /** called once the guest runs here: from then on it must never be discarded */
  onRunning(): void;
  /** the fault service, as soon as it exists (a failure must stop it) */
  onFaults(f: FaultService): void;
  /** only these pages were allocated ahead (Accepted.resident) */
  resident: PageExtents | undefined;
  /** with disks: the guest's memory alone (`region` is memory and disks), and the images */
  memory?: Region;
  disks?: IncomingDisk[];
  /** with disks: the images are the guest's once every block is here */
  onDisksDone?(): void;
  /** with disks: the images' watch, made when they were created */
  diskWatch?: WatchedImages;
}

/**
 * After a partial reservation: a page the source will still send must be in this side's file
 * before the guest runs (the guest's first touch of a hole would get a zero page that no
 * minor fault stops), and a page it will not send that the file holds nothing for is a hole
 * both sides read as zero: marked 2, nothing to map. What was reserved ahead (`resident`) holds
 * data; only the rest is asked of the file (pages that arrived there in pre-copy), so that a
 * fully reserved region costs nothing inside the pause. Walks the holes only.
 */
async function settleHoles(region: Region, needed: Uint8Array, resident: PageExtents, memoryPages: number): Promise<void> {
  // a disk's holes need nothing: an access to a block not here waits for it (src/disk/watch.ts)
  const gaps = clipExtents(complement(resident, region.pageCount), memoryPages);
  if (gaps.length === 0) return;
  const holes = clipExtents(complement(union(resident, await region.dataExtents({ within: gaps, now: true })), region.pageCount), memoryPages);
  const allocate: number[] = [];
  for (let i = 0; i < holes.length; i += 2) {
    for (let p = holes[i]!; p < holes[i + 1]!; p++) {
      if (needed[p] !== 1) {
        needed[p] = 2;
        continue;
      }
      if (allocate.length && allocate.at(-1) === p) allocate[allocate.length - 1] = p + 1;
      else allocate.push(p, p + 1);
    }
  }
  if (allocate.length) await region.allocate(Float64Array.from(allocate));
}

/** The extents' pages below `limit`. */
function clipExtents(e: PageExtents, limit: number): PageExtents {
  const out: number[] = [];
  for (let i = 0; i < e.length; i += 2) if (e[i]! < limit) out.push(e[i]!, Math.min(e[i + 1]!, limit));
  return Float64Array.from(out);
}

/** POSTCOPY: checked against what was negotiated and what arrived, then the switch. */
export async function switchToPostcopy(ctx: ReceiverContext, payload: Buffer, a: Accepted, got: Received): Promise<ReceiveReport> {
  const postcopy = ctx.options.postcopy;
  const session = ctx.session;
  if (!postcopy || !session || !a.postcopy) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY, which was not negotiated');
  if (ctx.stage !== 'receiving') throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `POSTCOPY while ${ctx.stage}`);
  if (got.deviceState === undefined) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', 'POSTCOPY before DEVICE_STATE');
  if (ctx.outcome && !ctx.outcome.beginActivation()) {
    throw new LivemigError('ERR_LIVEMIG_REFUSED', 'this session was resolved as not activated: it is fenced and will never run here', { phase: 'activate' });
  }
  return runPostcopy(
    {
      conn: ctx.conn,
      payload,
      region: a.region,
      hashes: a.hashes,
      deviceState: got.deviceState,
      version: ctx.version,
      session,
      options: { ...ctx.options, postcopy },
      progress: (e) => ctx.progress(e),
      onRunning: () => {
        ctx.enter('postcopy');
        ctx.outcome?.settle('activated');
      },
      onFaults: (s) => (ctx.faults = s),
      resident: a.resident,
      ...(a.memory && a.disks && ctx.diskWatch
        ? { memory: a.memory, disks: a.disks, diskWatch: ctx.diskWatch, onDisksDone: () => (ctx.disks = undefined) }
        : {}),
    },
    {
      region_bytes: a.region.size,
      regions: ctx.regionsReport(),
      local: false,
      reserve_ms: a.reserveMs,
      pages_received: got.pages,
      rounds: got.rounds,
      security: ctx.security,
    },
  );
}

async function runPostcopy(o: PostcopyStart, base: Omit<ReceiveReport, 'mode' | 'digest' | 'activate_ms' | 'postcopy' | 'confirmed'>): Promise<ReceiveReport> {
  const { region } = o;
  trace('receiver', ReceiverEvent.postcopyReceived);
  const late = `POSTCOPY, but no priority connection attached within ${PRIO_ATTACH_WAIT_MS} ms`;
  const { prio } = await o.session.take(['prio'], PRIO_ATTACH_WAIT_MS, () => new ProtocolError('ERR_LIVEMIG_PROTOCOL', late));
  const unpacked = call('ERR_LIVEMIG_PROTOCOL', 'postcopy', 'unpacking the POSTCOPY bitmap', () =>
    addon.unpackBits(decodePostcopy(o.payload, region.pageCount).needed, region.pageCount, o.session.neededTable),
  );
  const pagesNeeded = unpacked.set;
  if (o.resident) await settleHoles(region, unpacked.bytes, o.resident, o.memory?.pageCount ?? region.pageCount);
  // From here the guest runs here: the source never resumes it (point of commitment).
  const ta = performance.now();
  const watched = o.diskWatch;
  try {
    return await runWatched(o, base, { ta, pagesNeeded, needed: unpacked.bytes, watched, prio });
  } finally {
    await watched?.close();
  }
}

async function runWatched(
  o: PostcopyStart,
  base: Omit<ReceiveReport, 'mode' | 'digest' | 'activate_ms' | 'postcopy' | 'confirmed'>,
  s: { ta: number; pagesNeeded: number; needed: Uint8Array; watched: WatchedImages | undefined; prio: FramedConnection },
): Promise<ReceiveReport> {
  const { conn, region, version, options, progress } = o;
  const { ta, pagesNeeded, watched, prio } = s;
  const reg = await options.postcopy.register(o.memory ?? region);
  trace('receiver', ReceiverEvent.registered);
  const asks = watched && options.postcopy.giveDiskAsks ? diskAsks(options.postcopy.giveDiskAsks) : undefined;
  const faults = new FaultService({
    region,
    uffd: reg.uffd,
    guest: 'ranges' in reg ? reg.ranges : reg.address,
    needed: s.needed,
    hashes: o.hashes,
    version,
    ...(watched && o.memory
      ? { disks: { fanotify: watched.fanotify, ...(asks !== undefined ? { asks } : {}), ranges: watched.ranges(o.memory.pageCount) } }
      : {}),
  });
  o.onFaults(faults);
  faults.start();
  faults.attach(conn.handle, prio.handle);
  prio.handOff();
  trace('receiver', ReceiverEvent.faultServiceStarted);
  await options.activate(o.memory ?? region, o.deviceState);
  trace('receiver', ReceiverEvent.guestActivatedPostcopy);
  o.onRunning();
  const activateMs = performance.now() - ta;
  // the guest runs here now, whatever happens to this frame: a link that broke under it is a
  // break like any later one (the source asks, RESOLVE says activated, and it attaches again)
  const notSent = (e: unknown): void => trace('receiver', ReceiverEvent.postcopyRunningNotSent, { reason: (e as Error).message });
  await conn.send(encodePostcopyRunning({ activateMs }, version)).catch(notSent);
  progress({ type: 'postcopy-running', activate_ms: activateMs, pages_needed: pagesNeeded });
  const tRun = performance.now();
  const reconnects = await servePostcopy(o, faults);
  const fs = faults.stats();
  options.onFaultLatencies?.(faults.latencies());
  // the thread stops by itself once every page is mapped into the guest
  await faults.done;
  faults.stop(); // joins the finished thread
  closeFd(reg.uffd, 'postcopy'); // our copy of the guest's userfaultfd (the guest keeps its own)
  if (asks !== undefined) closeFd(asks, 'postcopy'); // the VMM's asks from now on find every block here
  if (o.disks) {
    // every block is in the images: on stable storage before this side reports, then the guest's alone
    await syncDisksFinal(o.disks);
    closeDisks(o.disks);
    o.onDisksDone?.();
  }
  conn.handOff();
  return {
    ...base,
    pages_received: base.pages_received + fs.pages_pulled + fs.pages_pushed,
    digest: (await faults.complete).toString(16).padStart(16, '0'),
    activate_ms: activateMs,
    mode: 'postcopy',
    postcopy: { ...fs, pages_needed: pagesNeeded, total_ms: +(performance.now() - tRun).toFixed(1), reconnects },
    confirmed: true, // post-copy ends with both digests: the source knows
  };
}

/**
 * The socket a VMM linking the guest library asks for blocks on: its end goes to the guest, ours
 * to the fault service. Returns ours, or undefined when the guest did not take it: the guest runs
 * here already (the source committed), and its accesses still wait on the images' marks.
 */
function diskAsks(give: (fd: number) => void): number | undefined {
  const [ours, theirs] = call('ERR_LIVEMIG_SYSCALL', 'postcopy', 'a socket for the guest to ask for blocks on', () => addon.socketPair(true));
  try {
    give(theirs);
    return ours;
  } catch (e) {
    trace('receiver', ReceiverEvent.diskAsksRefused, { reason: (e as Error).message });
    closeFd(ours, 'postcopy');
    return undefined;
  } finally {
    closeFd(theirs, 'postcopy');
  }
}

/**
 * Waits for post-copy to complete; after a break, for the source to attach again (both
 * connections), then tells it what this side holds. Resolves with the number of reconnections.
 */
async function servePostcopy(o: PostcopyStart, faults: FaultService): Promise<number> {
  const { session, region, version, options, progress } = o;
  const recoverMs = options.recoverTimeoutMs ?? 60_000;
  let reconnects = 0;
  let broken: string | undefined = faults.broken;
  let wake: (() => void) | undefined;
  const off = faults.on((e) => {
    if (e.type !== 'disconnected') return;
    broken = e.message ?? 'the link broke';
    wake?.();
  });
  let done = false;
  faults.complete.then(
    () => ((done = true), wake?.()),
    () => wake?.(),
  );
  const timer = setInterval(() => progress({ type: 'postcopy-progress', ...faults.stats() }), 1000);
  try {
    for (;;) {
      if (done) return reconnects;
      if (broken === undefined) {
        // a source that attaches again has given its old connections up, even where they
        // still look alive from here (a link that was dark, then came back)
        await Promise.race([faults.complete, new Promise<void>((r) => (wake = r)), session.joined(['push', 'prio'])]);
        if (!done && broken === undefined && session.has('push') && session.has('prio')) broken = 'the source attached again';
        continue;
      }
      const why = broken;
      progress({ type: 'postcopy-disconnected', message: why });
      trace('receiver', ReceiverEvent.postcopyLinkBroke, { reason: why });
      const { push, prio } = await session.take(['push', 'prio'], recoverMs, () => {
        const held = faults.heldCount();
        const lost = `${region.pageCount - held} pages exist only there, so the guest here cannot finish`;
        return new LivemigError('ERR_LIVEMIG_SOURCE_LOST', `the source did not come back within ${recoverMs} ms (${why}); ${lost}`, { phase: 'postcopy' });
      });
      await prio.answerFirst(encodeAttached({ held: bytesToBitmap(faults.held()) }, version));
      faults.attach(push.handle, prio.handle);
      // breaks heard until now were of the connections just replaced (later ones name these)
      broken = undefined;
      push.handOff();
      prio.handOff();
      reconnects++;
      progress({ type: 'postcopy-reconnected', pages_held: faults.heldCount() });
    }
  } finally {
    clearInterval(timer);
    off();
  }
}
