import { statSync } from 'node:fs';
/** Flags shared by the commands that migrate a reference guest (demo, send), and their parsing. */
import { HUGE_PAGE_MODES, HUGE_PAGE_SIZE, type HugePages } from '../region/huge-pages.js';
import type { GuestSpec, PolicyFlags } from '../demo/demo.js';
import { MAX_BEAT_MS } from '../workload/state.js';
import { PAGE_SIZE } from '../protocol/format.js';
import type { ProgressEvent } from '../source/types.js';
import { CONTENTS, PATTERNS, type ContentName, type PatternName } from '../workload/content.js';
import { str, usageError, type FlagValues, type Flags } from './flags.js';
import { parseNumber, parseSize } from './units.js';

const STALL = ['throttle', 'postcopy', 'force', 'abort'] as const;
const MODES = ['precopy', 'postcopy', 'hybrid'] as const;

export const GUEST_FLAGS: Flags = {
  size: { type: 'string', default: '1GiB', value: 'SIZE', help: "the reference guest's memory (a multiple of 4 KiB)" },
  content: { type: 'string', default: 'mixed', value: CONTENTS.join('|'), help: 'what its pages hold (docs/CONTENT.md)' },
  rate: { type: 'string', default: '64', value: 'MiB/s', help: 'how fast it writes while migrating' },
  pattern: { type: 'string', default: 'uniform', value: PATTERNS.join('|'), help: 'where it writes' },
  'hot-size': { type: 'string', default: '64MiB', value: 'SIZE', help: 'the hot set of --pattern hot' },
  'huge-pages': {
    type: 'string',
    default: 'none',
    value: HUGE_PAGE_MODES.join('|'),
    help:
      "its memory's pages: none (4 KiB shmem), thp (shmem transparent huge pages; needs shmem_enabled advise, always or within_size), " +
      'hugetlb (2 MiB hugetlbfs pages from vm.nr_hugepages; --size a multiple of 2 MiB)',
  },
};

/** The example guests' disk (native/guest/example/example_disk.h). */
export const DISK_FLAGS: Flags = {
  disk: {
    type: 'string',
    value: 'SIZE',
    help: 'give the guest a disk of SIZE (sparse: an eighth data, a thirty-second zeros), checked block by block after it moved',
  },
  'disk-rate': { type: 'string', default: '4', value: 'MB/s', help: 'how fast the guest writes random 4 KiB blocks to its disk' },
  'disk-untracked': {
    type: 'boolean',
    default: false,
    help: 'the guest reports no disk writes: livemig finds them itself (reflink on XFS/btrfs, else hashing)',
  },
};

/** --disk and its company: bytes, MB/s, and whether the guest reports its writes; undefined without --disk. */
export function diskSpec(v: FlagValues): { size: number; rate: number; noTrack: boolean } | undefined {
  if (typeof v['disk'] !== 'string') return undefined;
  const size = parseSize(v['disk'], '--disk');
  if (size <= 0 || size % PAGE_SIZE !== 0) throw usageError(`--disk must be a positive multiple of 4 KiB, got ${size} bytes`);
  return { size, rate: parseNumber(str(v, 'disk-rate'), '--disk-rate (MB/s)'), noTrack: v['disk-untracked'] === true };
}

export const POLICY_FLAGS: Flags = {
  'downtime-limit': { type: 'string', default: '50', value: 'MS', help: 'stop and copy once the rest fits this pause' },
  'max-rounds': { type: 'string', default: '30', value: 'N', help: 'at most this many pre-copy rounds' },
  'max-bytes': { type: 'string', value: 'SIZE', help: 'at most this much sent in pre-copy (default 3x the region)' },
  'on-stall': {
    type: 'string',
    value: STALL.join('|'),
    help: 'when pre-copy does not converge (default throttle; force for a guest that cannot be throttled, as a QEMU VM)',
  },
  bandwidth: { type: 'string', value: 'MiB/s', help: 'cap the rate of pre-copy, smoothly (default none)' },
  'postcopy-bandwidth': {
    type: 'string',
    value: 'MiB/s',
    help: "cap post-copy's push of the pages left (default none: the guest waits on each one not there)",
  },
  deadline: { type: 'string', value: 'SECONDS', help: 'finish, or give up with the guest still here, by then' },
  'max-pause': { type: 'string', default: '5000', value: 'MS', help: 'no commitment this long after the pause: abort, the guest resumes here' },
  'progress-timeout': { type: 'string', default: '30', value: 'SECONDS', help: 'no progress from the destination this long: abort, the guest keeps running' },
  'handshake-timeout': { type: 'string', default: '60', value: 'SECONDS', help: 'authentication, HELLO and the destination reserving the region, at most' },
  'resolve-timeout': { type: 'string', default: '30', value: 'SECONDS', help: 'link lost after the commitment: ask the destination what happened this long' },
  'recover-timeout': { type: 'string', default: '60', value: 'SECONDS', help: 'post-copy: a broken link must be re-established within this' },
  mode: { type: 'string', value: MODES.join('|'), help: 'post-copy: the guest moves at once, its pages follow (default precopy)' },
  'no-wws': { type: 'boolean', default: false, help: 'send pages rewritten every round each round (no writable working set)' },
  'rate-adapt': { type: 'string', value: 'START:INC', help: "Clark's rate adaptation, MiB/s: first round at START, then the dirty rate + INC" },
  channels: { type: 'string', value: 'N', help: "pre-copy's pages over N connections, 1..16 (default one per core up to 4; the destination may grant fewer)" },
  'read-path': {
    type: 'string',
    default: 'auto',
    value: 'auto|mapping|files',
    help:
      "how the guest's pages are read: through this process's mapping of them or through their files; " +
      "auto times both on the guest's pages and takes the faster",
  },
  'no-zero': { type: 'boolean', default: false, help: 'send zero pages as bytes' },
  'no-dedup': { type: 'boolean', default: false, help: 'send pages the destination holds as bytes' },
  'no-compress': { type: 'boolean', default: false, help: 'never compress pages (LZ4)' },
  json: { type: 'boolean', default: false, help: 'print the report as one JSON line, no progress' },
};

export function guestSpec(v: FlagValues): GuestSpec {
  const content = str(v, 'content');
  const pattern = str(v, 'pattern');
  if (!(CONTENTS as readonly string[]).includes(content)) throw usageError(`--content must be one of ${CONTENTS.join(', ')}, got '${content}'`);
  if (!(PATTERNS as readonly string[]).includes(pattern)) throw usageError(`--pattern must be one of ${PATTERNS.join(', ')}, got '${pattern}'`);
  const size = parseSize(str(v, 'size'), '--size');
  if (size % PAGE_SIZE !== 0) throw usageError(`--size must be a multiple of 4 KiB, got ${size} bytes`);
  return {
    size,
    content: content as ContentName,
    pattern: pattern as PatternName,
    rate: parseNumber(str(v, 'rate'), '--rate'),
    hotSize: parseSize(str(v, 'hot-size'), '--hot-size'),
    ...hugePagesFlag(v, size),
  };
}

function hugePagesFlag(v: FlagValues, size: number): { hugePages?: HugePages } {
  const mode = str(v, 'huge-pages');
  if (!(HUGE_PAGE_MODES as readonly string[]).includes(mode)) throw usageError(`--huge-pages must be one of ${HUGE_PAGE_MODES.join(', ')}, got '${mode}'`);
  if (mode === 'hugetlb' && size % HUGE_PAGE_SIZE !== 0) throw usageError(`--huge-pages hugetlb: --size must be a multiple of 2 MiB, got ${size} bytes`);
  return mode === 'none' ? {} : { hugePages: mode as HugePages };
}

/** --beat-ms: how often a reference guest started here ticks and beats (1..MAX_BEAT_MS ms). */
export const BEAT_FLAG: Flags = {
  'beat-ms': {
    type: 'string',
    default: '1',
    value: 'MS',
    help: `ms between its ticks and heartbeats, 1..${MAX_BEAT_MS} (more spares the CPU where nobody measures its gaps in ms)`,
  },
};

export function beatMs(v: FlagValues): { beatMs?: number } {
  const ms = parseNumber(str(v, 'beat-ms'), '--beat-ms', 1);
  if (!Number.isInteger(ms) || ms > MAX_BEAT_MS)
    throw usageError(`--beat-ms must be a whole number of ms from 1 to ${MAX_BEAT_MS}, got '${str(v, 'beat-ms')}'`);
  return ms === 1 ? {} : { beatMs: ms };
}

export function policyFlags(v: FlagValues): PolicyFlags {
  const o: PolicyFlags = {};
  const stall = v['on-stall'];
  if (typeof stall === 'string') {
    if (!(STALL as readonly string[]).includes(stall)) throw usageError(`--on-stall must be throttle, postcopy, force or abort, got '${stall}'`);
    o.onStall = stall as PolicyFlags['onStall'];
  }
  if (typeof v['bandwidth'] === 'string') o.bandwidthMiBps = parseNumber(v['bandwidth'], '--bandwidth (MiB/s)', Number.MIN_VALUE);
  if (typeof v['postcopy-bandwidth'] === 'string')
    o.postcopyBandwidthMiBps = parseNumber(v['postcopy-bandwidth'], '--postcopy-bandwidth (MiB/s)', Number.MIN_VALUE);
  if (typeof v['deadline'] === 'string') o.deadlineMs = parseNumber(v['deadline'], '--deadline (seconds)', Number.MIN_VALUE) * 1000;
  if (typeof v['max-pause'] === 'string') o.maxPauseMs = parseNumber(v['max-pause'], '--max-pause (ms)', Number.MIN_VALUE);
  if (typeof v['progress-timeout'] === 'string')
    o.progressTimeoutMs = parseNumber(v['progress-timeout'], '--progress-timeout (seconds)', Number.MIN_VALUE) * 1000;
  if (typeof v['handshake-timeout'] === 'string')
    o.handshakeTimeoutMs = parseNumber(v['handshake-timeout'], '--handshake-timeout (seconds)', Number.MIN_VALUE) * 1000;
  if (typeof v['resolve-timeout'] === 'string') o.resolveTimeoutMs = parseNumber(v['resolve-timeout'], '--resolve-timeout (seconds)', Number.MIN_VALUE) * 1000;
  if (typeof v['recover-timeout'] === 'string') o.recoverTimeoutMs = parseNumber(v['recover-timeout'], '--recover-timeout (seconds)', Number.MIN_VALUE) * 1000;
  if (v['no-wws']) o.wws = false;
  if (typeof v['rate-adapt'] === 'string') {
    const [a, b] = v['rate-adapt'].split(':');
    o.rateAdaptation = {
      startMiBps: parseNumber(a ?? '', '--rate-adapt START', Number.MIN_VALUE),
      incrementMiBps: parseNumber(b ?? '50', '--rate-adapt INCREMENT'),
    };
  }
  if (typeof v['channels'] === 'string') o.channels = channelCount(v['channels'], '--channels');
  const readPath = v['read-path'];
  if (typeof readPath === 'string' && readPath !== 'auto') {
    if (readPath !== 'mapping' && readPath !== 'files') throw usageError(`--read-path must be auto, mapping or files, got '${readPath}'`);
    o.readPath = readPath;
  }
  if (typeof v['max-bytes'] === 'string') o.maxBytes = parseSize(v['max-bytes'], '--max-bytes');
  const mode = v['mode'];
  if (typeof mode === 'string') {
    if (!(MODES as readonly string[]).includes(mode)) throw usageError(`--mode must be precopy, postcopy or hybrid, got '${mode}'`);
    o.mode = mode as PolicyFlags['mode'];
  }
  return o;
}

/** A number of channels, 1..16, from a flag. */
export function channelCount(text: string, flag: string): number {
  const n = parseNumber(text, flag, 1);
  if (!Number.isInteger(n) || n > 16) throw usageError(`${flag} must be a whole number from 1 to 16, got '${text}'`);
  return n;
}

export function encodingFlags(v: FlagValues): { zero: boolean; dedup: boolean; compress: boolean } {
  return { zero: !v['no-zero'], dedup: !v['no-dedup'], compress: !v['no-compress'] };
}

export function downtimeLimit(v: FlagValues): number {
  return parseNumber(str(v, 'downtime-limit'), '--downtime-limit', Number.MIN_VALUE);
}

export function maxRounds(v: FlagValues): number {
  const n = parseNumber(str(v, 'max-rounds'), '--max-rounds', 1);
  if (!Number.isInteger(n)) throw usageError(`--max-rounds must be a whole number, got '${n}'`);
  return n;
}

/** A round and the handshake as one line each (undefined for the other events). */
export function progressLine(e: ProgressEvent): string | undefined {
  if (e.type === 'round') {
    return (
      `  round ${String(e.round).padStart(2)}: ${String(e.pages).padStart(7)} pages ${(e.bytes / 2 ** 20).toFixed(1).padStart(8)} MiB in ` +
      `${e.duration_ms.toFixed(1).padStart(7)} ms (${e.mbps.toFixed(0)} MB/s); ${e.dirty_pages} dirty, ${e.wws_pages} held, est. ` +
      `${e.expected_downtime_ms.toFixed(1)} ms${e.cpu_throttle_percentage ? `, throttle ${e.cpu_throttle_percentage}%` : ''} -> ${e.decision}`
    );
  }
  if (e.type === 'handshake')
    return `  handshake + reservation: ${e.prep_ms.toFixed(0)} ms; tracking: ${e.tracker}; channels: ${e.channels} (${e.channels_reason})`;
  return undefined;
}

/** A round and the handshake as one line each on stderr. */
export function printProgress(e: ProgressEvent): void {
  const line = progressLine(e);
  if (line !== undefined) process.stderr.write(line + '\n');
}

/** --disk-dir: a directory that exists, checked before listening. */
export function diskDir(dir: string): string {
  let st;
  try {
    st = statSync(dir);
  } catch (e) {
    throw usageError(`--disk-dir ${dir}: ${(e as Error).message}`);
  }
  if (!st.isDirectory()) throw usageError(`--disk-dir ${dir} is not a directory`);
  return dir;
}

/** --keep-disks SECONDS: how long a failed migration's disk images are kept for the guest's next try. */
export function keepDisks(v: FlagValues): { keepMs?: number } {
  return typeof v['keep-disks'] === 'string' ? { keepMs: parseNumber(v['keep-disks'], '--keep-disks (seconds)') * 1000 } : {};
}
