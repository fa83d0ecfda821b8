/**
 * Which tracker follows the guest's memory, and why (the report's `tracker_reason`): the
 * caller's, the shared one of a same-host upgrade, hashing for a guest that registered nothing,
 * else the best this kernel offers. One choice for a migration with or without disks.
 */
import type { Region } from '../region/region.js';
import { HashTracker } from '../tracking/hash.js';
import { chooseTracker } from '../tracking/probe.js';
import { SharedMemoryTracker } from '../tracking/shared.js';
import type { DirtyTracker } from '../tracking/types.js';
import type { MigrateOptions } from './types.js';

export function memoryTracker(
  region: Region,
  options: Pick<MigrateOptions, 'tracker' | 'untracked' | 'target'>,
  local: boolean,
): { tracker: DirtyTracker; reason: string } {
  if (options.tracker) return { tracker: options.tracker, reason: (options.tracker as { reason?: string }).reason || 'given by the caller' };
  if (local)
    return { tracker: new SharedMemoryTracker(region.pageCount), reason: 'shared: a same-host upgrade; the destination maps the very memory, nothing is sent' };
  if (options.untracked)
    return {
      tracker: new HashTracker(region),
      reason: 'hash: the guest registered no write tracking (userfaultfd WP_ASYNC), so every page is hashed each round',
    };
  const choice = chooseTracker(region, options.target ? { target: options.target } : {});
  return { tracker: choice.tracker, reason: `${choice.backend}: ${choice.reason}` };
}
