/**
 * The guest contract, livemig's side of its checks (docs/GUEST.md is the spec; the guest's side
 * is native/guest/livemig_guest.c). A guest listens on a unix socket; livemig connects; the
 * guest's first message is its hello. Everything in a hello is hostile until checked here.
 * The version, limits and tags are defined once, in native/guest/livemig_guest.h: this is
 * livemig's copy, held equal to the addon's by test/guest-contract.test.ts.
 */
import { fstatSync, readlinkSync } from 'node:fs';
import { LivemigError } from '../errors.js';
import { PAGE_SIZE } from '../protocol/format.js';
import { checkDisks, DISK_BLOCK, MAX_DISKS } from '../disk/spec.js';
import { GuestLayout, MAX_GUEST_REGIONS, REGION_NAME } from './layout.js';

/** the newest contract version livemig speaks: LMG_CONTRACT */
export const GUEST_CONTRACT = 4;
/** the oldest it still speaks, so that a guest built against the version before keeps working: LMG_CONTRACT_OLDEST */
export const GUEST_CONTRACT_OLDEST = 2;
/** the oldest version with disks (a hello with disks starts at it): LMG_CONTRACT_DISKS */
export const GUEST_CONTRACT_DISKS = 4;
/** most disks a guest hands over: LMG_MAX_DISKS */
export const MAX_GUEST_DISKS = MAX_DISKS;
/** a message's largest body, both ways (a device state): LMG_MAX_BODY */
export const MAX_MESSAGE_BODY = 64 * 1024 * 1024;
/** a hello's largest size: LMG_MAX_HELLO */
export const MAX_HELLO_BYTES = 64 * 1024;

/** Message tags (u8), livemig's requests and the guest's answers: LMG_TAG_* with the key in UPPER_SNAKE. */
export const Tag = {
  contract: 0x56, // V  + u32 LE version -> v (contract 3): the version spoken from now on, before any other request
  contractAgreed: 0x76,
  hello: 0x48, // H  guest -> livemig, first: JSON (+ a memfd per region from a source guest)
  pause: 0x50, // P  [+ u32 lease ms] -> p + device state
  paused: 0x70,
  commit: 0x43, // C  -> c
  committed: 0x63,
  resume: 0x52, // R  -> r
  resumed: 0x72,
  throttle: 0x54, // T  + u8 percent -> t
  throttled: 0x74,
  release: 0x58, // X  -> x, and the guest stops for good
  released: 0x78,
  regions: 0x4d, // M  livemig -> incoming guest: the region table + a memfd per region -> m
  mapped: 0x6d,
  loadState: 0x53, // S  + device state -> s
  stateLoaded: 0x73,
  register: 0x55, // U  -> u + u32 count + count x u64 address (+ the userfaultfd)
  registered: 0x75,
  go: 0x47, // G  -> g
  going: 0x67,
  allPresent: 0x41, // A  -> a (post-copy: every page is in place)
  allPresentAck: 0x61,
  diskAsks: 0x4b, // K  + the socket the VMM asks for blocks on (post-copy with disks) -> k
  diskAsksTaken: 0x6b,
  error: 0x65, // e  + utf8 reason, to any request
} as const;

export type Tracking = 'uffd-wp-async' | 'none';

export interface GuestRegion {
  id: number;
  name: string;
  size: number;
  pageSize: number;
  /** where the guest maps it (for tracking its writes) */
  address: bigint;
  /** where the region starts in its memfd */
  offset: number;
  tracking: Tracking;
  /** livemig's copy of the region's memfd */
  fd: number;
}

/** The contract version a session speaks, and the one the guest's hello spoke. */
export interface AgreedContract {
  /** the newest version both speak (GUEST_CONTRACT_OLDEST..GUEST_CONTRACT) */
  contract: number;
  /** the version the hello speaks; when `contract` is newer, livemig tells the guest first ('V') */
  helloContract: number;
}

/** A disk a source guest handed over (contract 4). */
export interface GuestDisk {
  name: string;
  size: number;
  /** livemig's copy of the image's descriptor */
  fd: number;
  /** where the image is (read through /proc/self/fd): a reflink tracker clones beside it */
  path: string;
  /** 'reported': the VMM marks its writes in `written`, a bitmap it shares */
  tracking: 'reported' | 'none';
  /** livemig's copy of the bitmap's memfd, when reported */
  written?: number;
}

export interface SourceHello extends AgreedContract {
  role: 'source';
  pid: number;
  name: string;
  regions: GuestRegion[];
  layout: GuestLayout;
  /** contract 4: the guest's disks, in order (empty: none) */
  disks: GuestDisk[];
}

export interface IncomingHello extends AgreedContract {
  role: 'incoming';
  pid: number;
  name: string;
}

export function refused(why: string, phase = 'handover'): LivemigError {
  return new LivemigError('ERR_LIVEMIG_HANDOVER', `guest hello refused: ${why}`, { phase });
}

/**
 * A hello speaks `contract` and may offer up to `contractMax`; livemig speaks
 * GUEST_CONTRACT_OLDEST..GUEST_CONTRACT. The session speaks the newest version in both ranges.
 */
function agreeOn(o: Record<string, unknown>): AgreedContract {
  const from = o.contract;
  const upTo = o.contractMax ?? o.contract;
  if (!Number.isSafeInteger(from) || !Number.isSafeInteger(upTo) || (upTo as number) < (from as number)) {
    throw refused(`contract ${JSON.stringify(o.contract)} up to ${JSON.stringify(o.contractMax)} is not a range of versions`);
  }
  const contract = Math.min(upTo as number, GUEST_CONTRACT);
  if (contract < Math.max(from as number, GUEST_CONTRACT_OLDEST)) {
    const offered = from === upTo ? `${String(from)}` : `${String(from)}..${String(upTo)}`;
    throw refused(`the guest speaks contract ${offered}, this livemig ${GUEST_CONTRACT_OLDEST}..${GUEST_CONTRACT}`);
  }
  return { contract, helloContract: from as number };
}

function helloObject(data: Buffer): Record<string, unknown> & AgreedContract {
  if (data.length > MAX_HELLO_BYTES) throw refused(`a hello of ${data.length} bytes (at most ${MAX_HELLO_BYTES})`);
  let h: unknown;
  try {
    h = JSON.parse(data.toString('utf8'));
  } catch {
    throw refused('the hello is not JSON');
  }
  if (typeof h !== 'object' || h === null || Array.isArray(h)) throw refused('the hello is not an object');
  const o = h as Record<string, unknown>;
  const agreed = agreeOn(o);
  if (!Number.isSafeInteger(o.pid) || (o.pid as number) <= 0) throw refused(`pid ${String(o.pid)} is not a positive integer`);
  if (typeof o.name !== 'string' || !REGION_NAME.test(o.name)) throw refused('name must be 1..63 characters of [A-Za-z0-9._-]');
  return { ...o, ...agreed };
}

/** An incoming guest's hello (it has no regions yet: livemig hands them over). */
export function parseIncomingHello(data: Buffer, fds: number): IncomingHello {
  const o = helloObject(data);
  if (o.role !== 'incoming') throw refused(`role ${JSON.stringify(o.role)}: a guest started for a migration's destination says "incoming"`);
  if (fds !== 0) throw refused(`an incoming guest's hello carries no descriptor, this one carried ${fds}`);
  return { contract: o.contract, helloContract: o.helloContract, role: 'incoming', pid: o.pid as number, name: o.name as string };
}

/**
 * A source guest's hello and the descriptors that came with it (one memfd per region, in
 * order). Refuses overlapping or misaligned regions, a memfd smaller than its region, too many
 * regions, a missing or extra descriptor. The caller closes `fds` either way.
 */
export function parseSourceHello(data: Buffer, fds: readonly number[]): SourceHello {
  const o = helloObject(data);
  if (o.role !== 'source') throw refused(`role ${JSON.stringify(o.role)}: a guest to migrate says "source"`);
  const list = o.regions;
  if (!Array.isArray(list) || list.length === 0) throw refused('regions must be a non-empty list');
  if (list.length > MAX_GUEST_REGIONS) throw refused(`${list.length} regions, more than the limit of ${MAX_GUEST_REGIONS}`);
  const diskList = o.disks === undefined ? [] : o.disks;
  if (diskList !== undefined && !Array.isArray(diskList)) throw refused('disks must be a list');
  if ((diskList as unknown[]).length && o.contract < GUEST_CONTRACT_DISKS)
    throw refused(`disks come with contract ${GUEST_CONTRACT_DISKS}, the session speaks ${o.contract}`);
  const reported = (diskList as unknown[]).filter((d) => (d as Record<string, unknown> | null)?.tracking === 'reported').length;
  const wanted = list.length + (diskList as unknown[]).length + reported;
  if (fds.length !== wanted)
    throw refused(
      `${list.length} regions and ${(diskList as unknown[]).length} disks (${reported} reported) need ${wanted} descriptors ` +
        `(a memfd per region, an image per disk, a bitmap per reported disk, in order), the hello carried ${fds.length}`,
    );
  const regions: GuestRegion[] = list.map((r: unknown, i) => checkRegion(r, i, fds[i]!));
  const layout = GuestLayout.checked(regions, 'the hello', (why) => refused(why.replace(/^the hello: /, '')));
  refuseOverlaps(regions, (r) => [r.address, BigInt(r.size)], 'in the guest');
  // two regions over the same bytes of one file would be one memory seen twice
  const files = regions.map((r) => {
    const st = fstatSync(r.fd);
    return { r, key: `${st.dev}:${st.ino}`, fileSize: st.size };
  });
  for (const f of files) {
    if (f.fileSize < f.r.offset + f.r.size)
      throw refused(`region ${f.r.name}: its memfd holds ${f.fileSize} bytes, fewer than offset ${f.r.offset} + size ${f.r.size}`);
  }
  for (const key of new Set(files.map((f) => f.key))) {
    refuseOverlaps(
      files.filter((f) => f.key === key).map((f) => f.r),
      (r) => [BigInt(r.offset), BigInt(r.size)],
      'in their memfd',
    );
  }
  const disks = checkGuestDisks(diskList as unknown[], fds.slice(list.length));
  // an image that is also a region's file, or another disk's, would be one store moved twice
  const stores = new Map<string, string>();
  for (const [what, fd] of [...files.map((f) => [`region ${f.r.name}`, f.r.fd] as const), ...disks.map((d) => [`disk ${d.name}`, d.fd] as const)]) {
    const st = fstatSync(fd);
    const key = `${st.dev}:${st.ino}:${st.rdev}`;
    const other = stores.get(key);
    if (other && (what.startsWith('disk') || other.startsWith('disk'))) throw refused(`${other} and ${what} are the same file`);
    stores.set(key, what);
  }
  return { contract: o.contract, helloContract: o.helloContract, role: 'source', pid: o.pid as number, name: o.name as string, regions, layout, disks };
}

/** The hello's disks and their descriptors (an image each, then a bitmap per reported disk). */
function checkGuestDisks(list: unknown[], fds: readonly number[]): GuestDisk[] {
  if (list.length === 0) return [];
  if (list.length > MAX_GUEST_DISKS) throw refused(`${list.length} disks, more than the limit of ${MAX_GUEST_DISKS}`);
  const specs = checkDisks(list, 'disk', (why) => refused(why));
  let bitmap = list.length;
  return specs.map((spec, i) => {
    const o = list[i] as Record<string, unknown>;
    if (o.blockSize !== DISK_BLOCK) throw refused(`disk ${spec.name}: block size ${String(o.blockSize)} (livemig moves ${DISK_BLOCK}-byte blocks)`);
    if (o.tracking !== 'reported' && o.tracking !== 'none')
      throw refused(`disk ${spec.name}: tracking ${JSON.stringify(o.tracking)} is unknown (reported or none)`);
    const fd = fds[i]!;
    const st = fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) throw refused(`disk ${spec.name}: its descriptor is neither a file nor a block device`);
    if (st.isFile() && st.size !== spec.size) throw refused(`disk ${spec.name}: the image holds ${st.size} bytes, its size says ${spec.size}`);
    const written = o.tracking === 'reported' ? fds[bitmap++]! : undefined;
    if (written !== undefined && !fstatSync(written).isFile()) throw refused(`disk ${spec.name}: its bitmap is not a memfd`);
    return { ...spec, fd, path: readlinkSync(`/proc/self/fd/${fd}`), tracking: o.tracking, ...(written !== undefined ? { written } : {}) };
  });
}

function checkRegion(v: unknown, i: number, fd: number): GuestRegion {
  if (typeof v !== 'object' || v === null) throw refused(`region ${i} is not an object`);
  const r = v as Record<string, unknown>;
  const name = typeof r.name === 'string' && REGION_NAME.test(r.name) ? r.name : `#${i}`;
  if (r.pageSize !== PAGE_SIZE) throw refused(`region ${name}: page size ${String(r.pageSize)} is not this host's ${PAGE_SIZE}`);
  if (typeof r.address !== 'string' || !/^[0-9]{1,20}$/.test(r.address)) throw refused(`region ${name}: address is not a decimal string`);
  const address = BigInt(r.address);
  if (address === 0n || address % BigInt(PAGE_SIZE) !== 0n || address >= 1n << 64n) throw refused(`region ${name}: address ${r.address} is not page-aligned`);
  if (!Number.isSafeInteger(r.size) || (r.size as number) <= 0 || (r.size as number) % PAGE_SIZE !== 0)
    throw refused(`region ${name}: size ${String(r.size)} is not a positive multiple of ${PAGE_SIZE}`);
  if (!Number.isSafeInteger(r.offset) || (r.offset as number) < 0 || (r.offset as number) % PAGE_SIZE !== 0)
    throw refused(`region ${name}: offset ${String(r.offset)} is not page-aligned`);
  if (r.tracking !== 'uffd-wp-async' && r.tracking !== 'none')
    throw refused(`region ${name}: tracking ${JSON.stringify(r.tracking)} is unknown (uffd-wp-async or none)`);
  return {
    id: r.id as number,
    name: r.name as string,
    size: r.size as number,
    pageSize: PAGE_SIZE,
    address,
    offset: r.offset as number,
    tracking: r.tracking,
    fd,
  };
}

function refuseOverlaps<T extends { name: string }>(items: T[], span: (t: T) => [bigint, bigint], where: string): void {
  const sorted = [...items].sort((a, b) => (span(a)[0] < span(b)[0] ? -1 : span(a)[0] > span(b)[0] ? 1 : 0));
  for (let i = 1; i < sorted.length; i++) {
    const [start, len] = span(sorted[i - 1]!);
    if (start + len > span(sorted[i]!)[0]) throw refused(`regions ${sorted[i - 1]!.name} and ${sorted[i]!.name} overlap ${where}`);
  }
}
