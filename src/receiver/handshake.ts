/**
 * Stage 1, handshake and reservation: HELLO's version, geometry and limits checked before
 * anything is reserved; then the region (or, in a same-host upgrade, the source's own memory)
 * reserved and mapped while the integrator prepares its guest, and ACCEPT with what this side
 * offers.
 */
import { createDiskImages, type IncomingDisk } from '../disk/incoming.js';
import { precontentRefusal } from '../disk/probe.js';
import { hashKeptImage, takeKeptImages } from '../disk/kept.js';
import { watchImages } from '../disk/watch.js';
import { diskBytes, type DiskSpec } from '../disk/spec.js';
import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { takeMemory } from '../guest/local.js';
import { GuestLayout } from '../guest/layout.js';
import { addon, call, callAsync, closeFd } from '../native.js';
import { ProtocolError } from '../protocol/errors.js';
import {
  CAP_CHANNELS,
  CAP_COMMIT_ACTIVATE,
  CAP_ENCODINGS,
  CAP_IMAGE_HASHES,
  CAP_LOCAL,
  CAP_POSTCOPY,
  CAP_POSTCOPY_PLANNED,
  CAP_RESOLVE,
  CAP_DISKS,
  CAP_HOLES,
  FrameType,
  MIN_PROTOCOL_VERSION,
  PROTOCOL_VERSION,
} from '../protocol/format.js';
import { frameLimits } from '../protocol/limits.js';
import { decodeHello, encodeAccept, encodeImageHashes, negotiateVersion, type Hello } from '../protocol/messages.js';
import { warmUpProtocol } from '../protocol/warmup.js';
import type { WireFrame } from '../protocol/wire.js';
import { PAGE_SIZE, Region, type CreateRegionOptions } from '../region/region.js';
import { shmemThpAllowed } from '../region/huge-pages.js';
import { isLoopback } from '../security/tls.js';
import { trace } from '../trace.js';
import { ReceiverEvent } from '../trace-events.js';
import { warmUpRuntime } from '../warmup.js';
import { type PageExtents } from '../pages/extents.js';
import { maxChannels } from './channels.js';
import { AUTH_TIMEOUT_MS, type Accepted, type ReceiverContext } from './context.js';
import { refusedBeforeReserving } from './failures.js';
import { loadImage } from './image.js';
import { memoryBudget } from './memory-budget.js';

/** Whether, and how, the source may switch to post-copy: what onReserved is told. */
type PostcopyPlan = 'planned' | 'possible' | 'no';

/** HELLO: version, geometry and limits checked before anything is reserved. */
export function checkHello(ctx: ReceiverContext, hello: WireFrame): Hello {
  const { options } = ctx;
  if (hello.type !== FrameType.Hello) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `the first frame must be HELLO, got ${FrameType[hello.type]}`);
  if (hello.version < MIN_PROTOCOL_VERSION || hello.version > PROTOCOL_VERSION) {
    const ours = `${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION}`;
    throw new ProtocolError('ERR_LIVEMIG_VERSION', `protocol version ${hello.version} is not supported (this receiver speaks ${ours})`);
  }
  const h = decodeHello(hello.payload);
  const v = negotiateVersion(h.versions);
  if (v === undefined) {
    const ours = `${MIN_PROTOCOL_VERSION}..${PROTOCOL_VERSION}`;
    throw new ProtocolError('ERR_LIVEMIG_VERSION', `no common protocol version: peer speaks ${h.versions[0]}..${h.versions[1]}, we speak ${ours}`);
  }
  ctx.version = v;
  // from here each frame's payload is bounded by what this region can need
  const deviceStateLimit = options.maxDeviceStateBytes !== undefined ? { maxDeviceStateBytes: options.maxDeviceStateBytes } : {};
  ctx.conn.setFrameLimits(frameLimits({ pageCount: h.regionBytes / PAGE_SIZE, ...deviceStateLimit }));
  if (v < 3 && (options.credentials !== undefined || !isLoopback(ctx.localAddress))) {
    const why = `protocol version ${v} does not let this side prove its image before the commit`;
    throw new ProtocolError('ERR_LIVEMIG_VERSION', `${why}: refused off loopback and with credentials (version 3 needed)`);
  }
  if (h.pageSize !== PAGE_SIZE) {
    throw new LivemigError('ERR_LIVEMIG_REFUSED', `page size ${h.pageSize} differs from this host's ${PAGE_SIZE}`, { phase: 'handshake' });
  }
  if (h.regionBytes % PAGE_SIZE !== 0) throw new ProtocolError('ERR_LIVEMIG_PROTOCOL', `region of ${h.regionBytes} bytes is not a whole number of pages`);
  // disks come only to a receiver told where to put them, and by pre-copy: refused before anything is reserved
  options.acceptDisks?.((h.disks ?? []).map((d) => d.name));
  if (h.disks && !options.disks)
    throw new LivemigError('ERR_LIVEMIG_REFUSED', `the guest has ${h.disks.length} disk(s) and this receiver takes none (ReceiveOptions.disks)`, {
      phase: 'handshake',
    });
  if (h.disks && (h.local !== undefined || !h.capabilities.includes(CAP_HOLES)))
    throw new LivemigError('ERR_LIVEMIG_REFUSED', 'disks move into fresh images: not with a same-host upgrade, nor without holes', { phase: 'handshake' });
  // disk post-copy needs the images watched (fanotify pre-content events): refused with the kernel's reason where it cannot be
  ctx.diskPostcopyRefusal = h.disks && options.disks && options.postcopy ? (options.postcopy.disksRefusal ?? precontentRefusal(options.disks.dir)) : undefined;
  if (h.disks && h.capabilities.includes(CAP_POSTCOPY_PLANNED) && ctx.diskPostcopyRefusal)
    throw new LivemigError('ERR_LIVEMIG_REFUSED', `post-copy with disks: ${ctx.diskPostcopyRefusal}`, { phase: 'handshake' });
  const memoryBytes = h.regionBytes - diskBytes(h.disks);
  if (options.maxRegionBytes !== undefined && memoryBytes > options.maxRegionBytes) {
    const why = `region of ${memoryBytes} bytes exceeds this receiver's limit of ${options.maxRegionBytes}`;
    throw new LivemigError('ERR_LIVEMIG_NO_MEMORY', why, { phase: 'reserve' });
  }
  // without a limit given, what this host can hold now
  // (a same-host upgrade allocates nothing: the memory is the source guest's own)
  const budget = options.maxRegionBytes === undefined && !h.local ? memoryBudget() : undefined;
  if (budget && memoryBytes > budget.bytes) {
    const why = `region of ${memoryBytes} bytes exceeds what this host can hold now (${budget.bytes} bytes: ${budget.why})`;
    throw new LivemigError('ERR_LIVEMIG_NO_MEMORY', `${why}; set maxRegionBytes (--max-region) to override`, { phase: 'reserve' });
  }
  ctx.layout = h.regions ? GuestLayout.of(h.regions) : GuestLayout.single(memoryBytes);
  // the last check: a shared budget (a daemon's) takes the bytes, or refuses with none taken
  ctx.releaseMemory = options.reserveMemory?.(memoryBytes, h.local !== undefined, h.guest);
  ctx.progress({
    type: 'hello',
    region_bytes: h.regionBytes,
    regions: ctx.regionsReport(),
    local: h.local !== undefined,
    peer: ctx.peer,
    ...(h.guest !== undefined ? { guest: h.guest } : {}),
  });
  return h;
}

/** Reserves the region (and its image), then ACCEPT with what this side offers. */
export async function reserve(ctx: ReceiverContext, h: Hello): Promise<Accepted> {
  const { options, version } = ctx;
  ctx.enter('reserve');
  const t0 = performance.now();
  trace('receiver', ReceiverEvent.reserving, { bytes: h.regionBytes });
  const local = h.local !== undefined && h.capabilities.includes(CAP_LOCAL);
  const postcopyCap =
    !local && !(h.disks && ctx.diskPostcopyRefusal) && version >= 2 && options.postcopy !== undefined && h.capabilities.includes(CAP_POSTCOPY);
  const postcopyPlanned = postcopyCap && h.capabilities.includes(CAP_POSTCOPY_PLANNED);
  const plan: PostcopyPlan = !postcopyCap ? 'no' : postcopyPlanned ? 'planned' : 'possible';
  // holes: the region starts as zeros the source need not send (no kept image to differ from);
  // with the source's hint, only the pages that held data are allocated ahead
  const image = local || h.disks ? undefined : (options.imageFor?.(h.guest, h.regionBytes) ?? options.reuseImage);
  const holes = !local && h.capabilities.includes(CAP_HOLES) && image === undefined;
  const resident = holes ? h.resident : undefined;
  const region = local ? await takeSourceMemory(ctx, h, plan) : await allocateRegion(ctx, h, plan, resident);
  const reserveMs = performance.now() - t0;
  ctx.progress({ type: 'reserved', region_bytes: region.size, reserve_ms: reserveMs });
  // a same-host upgrade receives no page: its digest is over nothing, as the source's is
  const hashes = new BigUint64Array(local ? 0 : region.pageCount);
  // Encodings (version 2): `hashes` says what each page holds from the start, all zero or
  // the kept image (whose hashes the sender receives); a dup is checked against it.
  const encodings = version >= 2 && h.capabilities.includes(CAP_ENCODINGS);
  const imageHashes = encodings && ((await startingImage(ctx, region, hashes, image)) || (await keptDiskHashes(ctx, region, hashes)));
  if (holes && !encodings) hashes.fill(call('ERR_LIVEMIG_SYSCALL', 'reserve', 'the zero page hash', () => addon.zeroPageHash()));
  // capabilities exist from version 2 on (PROTOCOL.md): none is taken under version 1
  const commitActivate = version >= 2 && h.capabilities.includes(CAP_COMMIT_ACTIVATE);
  const caps = [
    ...(local ? [CAP_LOCAL] : []),
    ...(encodings ? [CAP_ENCODINGS] : []),
    ...(imageHashes ? [CAP_IMAGE_HASHES] : []),
    ...(commitActivate ? [CAP_COMMIT_ACTIVATE] : []),
    ...(postcopyCap ? [CAP_POSTCOPY] : []),
    ...(holes ? [CAP_HOLES] : []),
    ...(h.disks ? [CAP_DISKS] : []),
  ];
  // post-copy: further connections join this session with ATTACH naming its token
  // channels: further connections join this session too (ATTACH role channel)
  const channelsCap = !local && version >= 3 && h.capabilities.includes(CAP_CHANNELS) && h.channels !== undefined;
  const channels = channelsCap ? Math.min(h.channels!, maxChannels(options.maxChannels)) : 1;
  if (channelsCap) caps.push(CAP_CHANNELS);
  ctx.session = postcopyCap || channels > 1 ? ctx.sessions.open(region.pageCount, channels) : undefined;
  // resolve: a source that loses the link after COMMIT asks what happened (RESOLVE, token)
  const resolve = version >= 3 && h.capabilities.includes(CAP_RESOLVE);
  const token = ctx.session?.token ?? (resolve ? randomBytes(16).toString('hex') : undefined);
  if (resolve) {
    caps.push(CAP_RESOLVE);
    ctx.outcome = ctx.outcomes.open(token!);
    // fenced while still receiving: end this migration now (its region is discarded)
    const why = 'the source resolved this session as not activated: discarded, and it will never activate';
    ctx.outcome.onFence = () => ctx.conn.abort(new LivemigError('ERR_LIVEMIG_ABORTED', why, { phase: ctx.stage }));
  }
  // the hand-over's code paths run once now, not for the first time inside the pause, and
  // before ACCEPT: a source with nothing to copy first (a same-host upgrade) pauses its guest
  // right after it, and this side's warm-up then held the CPU its wake-up was queued on
  // (0.6 ms measured with perf sched)
  warmUpRuntime();
  warmUpProtocol(version);
  const accept = { version, capabilities: caps, ...(token ? { session: token } : {}), ...(channelsCap ? { channels } : {}) };
  await ctx.conn.answerFirst(encodeAccept(accept, version));
  if (imageHashes) await ctx.conn.send(encodeImageHashes(hashes, version));
  const disks = ctx.memory && ctx.disks ? { memory: ctx.memory, disks: ctx.disks } : {};
  return { region, hashes, encodings, commitActivate, postcopyPlanned, reserveMs, local, channels, postcopy: postcopyCap, resident, ...disks };
}

/**
 * A same-host upgrade: the source's memory itself, by reference; nothing to allocate. A bad
 * offer (another host's boot id, no socket, not a socket) has reserved nothing: the listener
 * refuses this connection and listens on.
 */
async function takeSourceMemory(ctx: ReceiverContext, h: Hello, plan: PostcopyPlan): Promise<Region> {
  const { options } = ctx;
  const layout = ctx.layout!;
  const taken = await takeMemory(h.local!, layout, options.authTimeoutMs ?? AUTH_TIMEOUT_MS).catch((e: unknown) => Promise.reject(refusedBeforeReserving(e)));
  ctx.region = taken.region;
  try {
    await options.onReserved?.(taken.region, plan, layout, { files: taken.pieces.map((p) => ({ fd: p.fd, offset: p.offset })), local: true });
  } finally {
    for (const p of taken.pieces) closeFd(p.fd, 'reserve'); // the region and the guest hold their own
  }
  return taken.region;
}

/** A region of our own, allocated off the event loop: the listener goes on answering others meanwhile. */
async function allocateRegion(ctx: ReceiverContext, h: Hello, plan: PostcopyPlan, resident: PageExtents | undefined): Promise<Region> {
  const { options } = ctx;
  const layout = ctx.layout!;
  const memoryBytes = h.regionBytes - diskBytes(h.disks);
  const memoryHint = resident && h.disks ? clip(resident, memoryBytes / PAGE_SIZE) : resident;
  const created = await Region.createReserved(memoryBytes, {
    name: 'livemig-incoming',
    ...backingFor(h),
    ...(memoryHint ? { extents: memoryHint } : {}),
  }).catch((e: unknown) => Promise.reject(refusedBeforeReserving(e)));
  trace('receiver', ReceiverEvent.regionAllocated);
  ctx.region = created;
  // Pre-copy writes pages of 4 KiB shmem through the file (native/region/file_io.h), unless
  // preallocated. Huge pages, and post-copy planned from the start, write through the mapping:
  // map it now (faults are slow on VM hosts), while the integrator prepares its side of the same
  // memory; both finish before the first page.
  const prealloc = options.prealloc === true && created.writesThroughFile;
  const viaMapping = prealloc || !created.writesThroughFile || plan === 'planned';
  const populated = viaMapping ? created.populateAsync(true, memoryHint).then(() => prealloc && created.writeInPlace()) : Promise.resolve();
  populated.catch(() => undefined); // awaited below, after onReserved
  // a kept image is taken back only where the source learns its hashes (encodings): else it would skip blocks the image holds stale
  const reuse = ctx.version >= 2 && h.capabilities.includes(CAP_ENCODINGS);
  const pages = h.disks ? await withDisks(ctx, created, h.disks, { postcopy: plan !== 'no', guest: h.guest, reuse, resident }) : created;
  const files = layout.regions.map((r) => ({ fd: created.fd, offset: r.firstPage * PAGE_SIZE }));
  const disks = ctx.disks?.map((d) => ({ name: d.name, path: d.path, size: d.size, fd: d.fd }));
  await options.onReserved?.(created, plan, layout, { files, local: false, ...(disks ? { disks } : {}) });
  await populated;
  return pages;
}

/**
 * The page space of a guest with disks: its memory, then each disk's image, created now where
 * the operator said. The guest's callbacks get its memory alone. Where post-copy may follow,
 * the images are watched from now on (src/disk/watch.ts) and pages land in them quietly.
 */
async function withDisks(
  ctx: ReceiverContext,
  memory: Region,
  disks: DiskSpec[],
  o: { postcopy: boolean; guest: string | undefined; reuse: boolean; resident: PageExtents | undefined },
): Promise<Region> {
  ctx.memory = memory;
  ctx.diskGuest = o.guest;
  const { dir, perGuest } = ctx.options.disks!;
  const where = perGuest ? guestDiskDir(dir, o.guest) : dir;
  const taken = o.reuse ? takeKeptImages(where, o.guest, disks) : [];
  ctx.keptDisks = taken.flatMap((t, i) => (t ? [i] : []));
  ctx.disks = createDiskImages(where, disks, taken);
  // where post-copy may follow, the blocks the source holds data for are allocated now: a block
  // landing while a guest's access waits for it then changes no block map (no journal to wait
  // on). Before the watch: an allocation of a watched file would wait for an answer too
  if (o.postcopy && o.resident) await allocateDiskData(ctx.disks, memory.pageCount, o.resident, taken);
  if (o.postcopy) ctx.diskWatch = await watchImages(ctx.disks);
  const quiet = ctx.diskWatch?.quiet;
  const pages = Region.adoptPieces([
    { fd: memory.fd, offset: 0, size: memory.size },
    ...ctx.disks.map((d, i) => ({ fd: quiet?.[i] ?? d.fd, offset: 0, size: d.size })),
  ]);
  ctx.region = pages;
  // --prealloc, where post-copy may follow: the page cache the source's data will land in is
  // read in now (the allocated extents read as zeros, no I/O), so that a block a guest's access
  // waits for lands in memory the host already handed over: its first touches were the tail of
  // those waits (a 64 KiB frame took 0.6-1.1 ms to land in 6% of them)
  if (o.postcopy && o.resident && ctx.options.prealloc) {
    const disksOnly = clipFrom(o.resident, memory.pageCount);
    if (disksOnly.length) await pages.populateAsync(false, disksOnly);
  }
  return pages;
}

/**
 * The hashes of the kept images taken back (withDisks) into `hashes`, which then says what this
 * side holds from the start: true when there was one, and the source is to learn them.
 */
async function keptDiskHashes(ctx: ReceiverContext, region: Region, hashes: BigUint64Array): Promise<boolean> {
  if (!ctx.disks || !ctx.keptDisks?.length) return false;
  let first = ctx.memory!.pageCount;
  const firsts = ctx.disks.map((d) => {
    const f = first;
    first += d.size / PAGE_SIZE;
    return f;
  });
  for (const i of ctx.keptDisks) {
    const d = ctx.disks[i]!;
    const start = firsts[i]!;
    const data = await region.dataExtents({ within: Float64Array.of(start, start + d.size / PAGE_SIZE) });
    await hashKeptImage(d.fd, data, hashes, start);
    ctx.progress({ type: 'image', path: d.path });
  }
  return true;
}

/** The source's data extents (page-space pages) of each fresh image, allocated in it. */
async function allocateDiskData(
  disks: IncomingDisk[],
  memoryPages: number,
  resident: PageExtents,
  taken: readonly (IncomingDisk | undefined)[],
): Promise<void> {
  let first = memoryPages;
  for (const [i, d] of disks.entries()) {
    const end = first + d.size / PAGE_SIZE;
    const ranges: number[] = [];
    for (let k = 0; k < resident.length; k += 2) {
      const a = Math.max(resident[k]!, first);
      const b = Math.min(resident[k + 1]!, end);
      if (a < b) ranges.push((a - first) * PAGE_SIZE, (b - a) * PAGE_SIZE);
    }
    if (!taken[i] && ranges.length)
      await callAsync('ERR_LIVEMIG_NO_MEMORY', 'reserve', `allocating disk ${d.name}'s data`, () => addon.fileAllocateAsync(d.fd, Float64Array.from(ranges)));
    first = end;
  }
}

/** A guest's own directory of images under `dir` (made, private, when it is not there): the source's name for it, or 'unnamed'. */
function guestDiskDir(dir: string, guest: string | undefined): string {
  // a name of dots would climb out of dir: the guest gets no directory of its own then
  const own = path.join(dir, guest === undefined || /^\.+$/.test(guest) ? 'unnamed' : guest);
  try {
    mkdirSync(own, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST')
      throw new LivemigError('ERR_LIVEMIG_REFUSED', `cannot make ${own} for the guest's disks: ${(e as Error).message}`, { phase: 'reserve', cause: e });
  }
  return own;
}

/** The extents from page `first` on. */
function clipFrom(e: PageExtents, first: number): PageExtents {
  const out: number[] = [];
  for (let i = 0; i < e.length; i += 2) if (e[i + 1]! > first) out.push(Math.max(e[i]!, first), e[i + 1]!);
  return Float64Array.from(out);
}

/** The extents within the first `pages` pages. */
function clip(e: PageExtents, pages: number): PageExtents {
  const out: number[] = [];
  for (let i = 0; i < e.length && e[i]! < pages; i += 2) out.push(e[i]!, Math.min(e[i + 1]!, pages));
  return Float64Array.from(out);
}

/**
 * The source's huge pages, here too (HELLO `backing`): hugetlbfs pages from this host's pool, or
 * refused when the pool cannot hold them (the guest was put on hugetlbfs on purpose); shmem THP
 * where this host's policy allows it, else 4 KiB pages, as the kernel here would give the guest.
 */
function backingFor(h: Hello): Pick<CreateRegionOptions, 'hugePages' | 'hugePageSize'> {
  const b = h.backing;
  if (b?.kind === 'hugetlb') return { hugePages: 'hugetlb', hugePageSize: b.pageSize };
  if (b?.kind === 'shmem-thp' && shmemThpAllowed()) return { hugePages: 'thp' };
  return {};
}

/** The kept image's pages and hashes, or all zero; true when the sender gets the image's hashes. */
async function startingImage(ctx: ReceiverContext, region: Region, hashes: BigUint64Array, path: string | undefined): Promise<boolean> {
  if (path && (await loadImage(region, path, hashes))) {
    ctx.progress({ type: 'image', path });
    return true;
  }
  if (path) ctx.progress({ type: 'image-ignored', path, reason: `its size is not the region's ${region.size} bytes` });
  hashes.fill(call('ERR_LIVEMIG_SYSCALL', 'reserve', 'the zero page hash', () => addon.zeroPageHash()));
  return false;
}
