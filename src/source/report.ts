/** The one report builder: what every ending of a migration says, from the context's counters. */
import type { PostcopyStats } from './types.js';
import { PAGE_SIZE } from '../protocol/format.js';
import type { RegionBacking } from '../region/huge-pages.js';
import type { SourceContext } from './context.js';
import type { MigrationReport } from './types.js';

export interface Ending {
  mode: MigrationReport['mode'];
  digest: bigint;
  totalMs: number;
  downtimeMs: number;
  stopAndCopy: MigrationReport['stop_and_copy'];
  /** the post-copy phase, when the migration ended with one */
  postcopy?: { stats: PostcopyStats; pagesNeeded: number; postcopyMs: number; verifyMs: number; capMiBps: number };
}

const NO_STOP_AND_COPY = { pages: 0, bytes: 0, pause_ms: 0, final_collect_ms: 0, send_ms: 0, commit_ms: 0 } as const;

/** The stop-and-copy figures of a migration that switched to post-copy instead. */
export function noStopAndCopy(activateMs: number): MigrationReport['stop_and_copy'] {
  return { ...NO_STOP_AND_COPY, activate_ms: +activateMs.toFixed(3) };
}

/** Whether the pause kept to the downtime limit in force at the stop, and if not, why. */
function downtimeVerdict(
  ctx: SourceContext,
  end: Ending,
): Pick<MigrationReport, 'downtime_limit_ms' | 'downtime_limit_met' | 'expected_downtime_ms' | 'downtime_limit_missed'> {
  const limit = ctx.settings.options.control?.downtimeLimitMs ?? ctx.settings.downtimeLimitMs;
  const expected = end.postcopy ? undefined : ctx.perRound.at(-1)?.expected_downtime_ms;
  const verdict = {
    downtime_limit_ms: limit,
    downtime_limit_met: end.downtimeMs <= limit,
    ...(expected !== undefined ? { expected_downtime_ms: expected } : {}),
  };
  if (verdict.downtime_limit_met) return verdict;
  const took = `the pause took ${end.downtimeMs.toFixed(1)} ms against a limit of ${limit} ms`;
  const sc = end.stopAndCopy;
  let why: string;
  if (end.postcopy) why = `${took}: the switch to post-copy (the guest's pause, its state and the destination's activation: ${sc.activate_ms} ms of it)`;
  else if (ctx.forcedStop) why = `${took}: the stop was forced (${ctx.stopReason}) with ${sc.pages} pages left, expected to take ${expected ?? '?'} ms`;
  else
    why =
      `${took}, expected ${expected ?? '?'} ms for ${sc.pages} pages: pausing the guest ${sc.pause_ms} ms` +
      `${sc.ran_after_pause_ms !== undefined ? ` (it ran on for ${sc.ran_after_pause_ms} ms of it, not counted)` : ''}` +
      `, the last collection ${sc.final_collect_ms} ms, ` +
      `sending ${sc.send_ms} ms, commitment ${sc.commit_ms} ms, activation ${sc.activate_ms} ms (a loaded host stretches each)`;
  return { ...verdict, downtime_limit_missed: why };
}

/**
 * The backing and what a write costs in resent bytes: uffd-wp on hugetlbfs protects and reports
 * whole huge pages; on shmem THP it splits the mapping and tracks 4 KiB pages; hashing compares
 * 4 KiB pages anywhere.
 */
function backingReport(b: RegionBacking, tracker: string): MigrationReport['backing'] {
  const wholeHugePages = b.kind === 'hugetlb' && tracker === 'uffd-async';
  return { kind: b.kind, page_size: b.pageSize, tracking_page_size: wholeHugePages ? b.pageSize : PAGE_SIZE };
}

export function buildReport(ctx: SourceContext, end: Ending): MigrationReport {
  const { tracker, encoder, prepMs, channels } = ctx.session;
  const es = channels.stats();
  const pc = end.postcopy;
  // each page once: a resent page went by push and by request
  const pcPages = pc ? pc.stats.pages_pushed + pc.stats.pages_served - pc.stats.pages_resent : 0;
  return {
    verified: true,
    mode: end.mode,
    digest: end.digest.toString(16).padStart(16, '0'),
    prep_ms: +prepMs.toFixed(1),
    total_ms: +end.totalMs.toFixed(1),
    downtime_ms: +end.downtimeMs.toFixed(3),
    ...downtimeVerdict(ctx, end),
    rounds: ctx.settings.mode === 'postcopy' ? 0 : ctx.round,
    region_bytes: ctx.settings.options.region.size,
    regions: ctx.settings.layout.regions.map((r, i) => ({ id: r.id, name: r.name, bytes: r.size, pages_sent: ctx.regionPages[i] ?? 0 })),
    ...(ctx.settings.options.disks?.length
      ? {
          disks: ctx.settings.options.disks.map((d, i) => ({
            name: d.name,
            bytes: d.size,
            blocks_sent: ctx.diskBlocks[i] ?? 0,
            block_mbps: end.totalMs > 0 ? +(((ctx.diskBlocks[i] ?? 0) * 4096) / 1e3 / end.totalMs).toFixed(1) : 0,
          })),
        }
      : {}),
    wire_bytes: ctx.bytesSent + (pc?.stats.bytes ?? 0),
    pages_sent: ctx.pagesSent + pcPages,
    backing: backingReport(ctx.settings.options.region.backing, tracker.backend),
    tracker: tracker.backend,
    tracker_reason: ctx.session.trackerReason,
    read_path: ctx.session.readPath.path,
    read_path_reason: ctx.session.readPath.reason,
    channels: ctx.session.channelChoice.count,
    channels_reason: ctx.session.channelChoice.reason + (channels.narrowedWhy ? `; the extra ones ended early: ${channels.narrowedWhy}` : ''),
    local: ctx.settings.options.local !== undefined,
    zero_pages: es?.zero_pages ?? 0,
    dup_pages: es?.dup_pages ?? 0,
    lz4_pages: es?.lz4_pages ?? 0,
    raw_pages: (es ? es.raw_pages : ctx.pagesSent) + pcPages,
    skipped_pages: es?.skipped_pages ?? 0,
    hole_pages: ctx.holePages,
    lz4_ratio: es && es.lz4_in > 0 ? +(es.lz4_out / es.lz4_in).toFixed(3) : 1,
    encodings: encoder !== undefined,
    per_round: ctx.perRound,
    stop_reason: pc ? ctx.stopReason || 'post-copy from the start' : ctx.stopReason,
    forced_stop: pc ? false : ctx.forcedStop,
    max_throttle_percentage: ctx.maxThrottle,
    stop_and_copy: end.stopAndCopy,
    security: ctx.session.security,
    ...(pc
      ? {
          postcopy: {
            ...pc.stats,
            pages_needed: pc.pagesNeeded,
            postcopy_ms: +pc.postcopyMs.toFixed(1),
            verify_ms: +pc.verifyMs.toFixed(1),
            max_bandwidth_mib_s: pc.capMiBps,
          },
        }
      : {}),
  };
}
