/** The reference guest's exported state: everything a guest on another host needs to continue. */
import { LivemigError } from '../errors.js';
import { CONTENTS, PATTERNS, type ContentName, type PatternName } from './content.js';

export interface GuestState {
  version: 1;
  size: number;
  content: ContentName;
  seed: string; // u64, decimal
  pattern: PatternName;
  span: number; // pages the writes fall in
  rate: number; // MiB/s
  xs: string; // write-stream xorshift state, decimal
  writes: string; // writes made so far, decimal
  heartbeatSeq: number;
  heartbeat?: string; // host:port heartbeats go to
  /** ms between the guest's ticks and beats (absent: 1); coarser for guests whose gaps nobody measures */
  beatMs?: number;
  throttle: number; // 0..1 fraction of the rate withheld (auto-converge, later)
  /** the guest's disk (native/guest/example/example_disk.h): bytes, and MB/s of 4 KiB writes */
  disk?: { size: number; rate: number };
  diskXs?: string; // the disk's write stream, decimal
  diskWrites?: string;
}

/** a guest beating less often than this would look gone to whoever waits for its beats */
export const MAX_BEAT_MS = 100;

const isDecimal = (s: unknown): s is string => typeof s === 'string' && /^[0-9]{1,20}$/.test(s) && BigInt(s) < 1n << 64n;

/** Parses device state received from the network: every field is checked. */
export function parseGuestState(data: Buffer): GuestState {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(data.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw new LivemigError('ERR_LIVEMIG_GUEST', 'guest state is not JSON', { phase: 'activate' });
  }
  const bad = (why: string): never => {
    throw new LivemigError('ERR_LIVEMIG_GUEST', `guest state rejected: ${why}`, { phase: 'activate' });
  };
  if (typeof o !== 'object' || o === null) bad('not an object');
  if (o.version !== 1) bad(`version ${String(o.version)}`);
  if (!Number.isSafeInteger(o.size) || (o.size as number) <= 0 || (o.size as number) % 4096 !== 0) bad('size');
  if (!(CONTENTS as readonly unknown[]).includes(o.content)) bad('content');
  if (!(PATTERNS as readonly unknown[]).includes(o.pattern)) bad('pattern');
  if (!Number.isSafeInteger(o.span) || (o.span as number) < 1 || (o.span as number) > (o.size as number) / 4096) bad('span');
  if (typeof o.rate !== 'number' || !((o.rate as number) >= 0)) bad('rate');
  if (!isDecimal(o.seed) || !isDecimal(o.xs) || !isDecimal(o.writes)) bad('seed/xs/writes');
  if (!Number.isSafeInteger(o.heartbeatSeq) || (o.heartbeatSeq as number) < 0) bad('heartbeatSeq');
  if (o.heartbeat !== undefined && (typeof o.heartbeat !== 'string' || !/^[^:]+:\d+$/.test(o.heartbeat))) bad('heartbeat');
  if (o.beatMs !== undefined && !(Number.isInteger(o.beatMs) && (o.beatMs as number) >= 1 && (o.beatMs as number) <= MAX_BEAT_MS)) bad('beatMs');
  if (typeof o.throttle !== 'number' || !((o.throttle as number) >= 0 && (o.throttle as number) <= 1)) bad('throttle');
  if (o.disk !== undefined) {
    const d = o.disk as Record<string, unknown>;
    if (typeof d !== 'object' || d === null || !Number.isSafeInteger(d.size) || (d.size as number) <= 0 || (d.size as number) % 4096 !== 0) bad('disk size');
    if (typeof d.rate !== 'number' || !(d.rate >= 0)) bad('disk rate');
    if (!isDecimal(o.diskXs) || !isDecimal(o.diskWrites)) bad('diskXs/diskWrites');
  }
  return o as unknown as GuestState;
}
