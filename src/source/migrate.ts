/**
 * The source side of a migration, as Clark's stages (one file each, sharing a SourceContext):
 *   handshake -> pre-copy rounds -> stop-and-copy -> commit and activation -> done
 *                               \-> switch to post-copy -> pages follow -> done
 * and rollback for any failure. Before commitment, any failure aborts: the destination
 * discards its copy and the guest resumes here. After ACTIVATE (or POSTCOPY) is sent and
 * before it is confirmed, the outcome is unknown: the source stays paused (never released,
 * never resumed) and the error says so.
 */
import { withDisks } from '../disk/source.js';
import { commitAndActivate } from './commit.js';
import { SourceContext, now } from './context.js';
import { handshake } from './handshake.js';
import { resolveOptions } from './options.js';
import { switchToPostcopy } from './postcopy-switch.js';
import { buildReport, type Ending } from './report.js';
import { rollback } from './rollback.js';
import { runRounds } from './rounds.js';
import { stopAndCopy } from './stop-and-copy.js';
import type { MigrateOptions, MigrationReport } from './types.js';

export async function migrate(given: MigrateOptions): Promise<MigrationReport> {
  // a guest's disks join its memory in one page space (src/disk/source.ts)
  const disks = given.disks?.length ? await withDisks(given) : undefined;
  try {
    return await migrateSpace(disks?.options ?? given);
  } finally {
    disks?.close();
  }
}

async function migrateSpace(options: MigrateOptions): Promise<MigrationReport> {
  const ctx = new SourceContext(resolveOptions(options));
  try {
    await handshake(ctx);
    // a same-host upgrade has nothing to copy ahead: the guest pauses once, its state moves
    const outcome = options.local ? await noRounds(ctx) : await runRounds(ctx);
    const end = outcome === 'postcopy' ? await switchToPostcopy(ctx) : await stopAndCopyAndActivate(ctx);
    ctx.unbindControl();
    ctx.channels?.closeExtras();
    await ctx.channels?.closeEncoders();
    if (options.release) await options.release();
    return buildReport(ctx, end);
  } catch (e) {
    throw await rollback(ctx, e);
  }
}

async function noRounds(ctx: SourceContext): Promise<'stop-and-copy'> {
  await ctx.session.tracker.start();
  ctx.enter('precopy');
  ctx.deadlines.watchProgress();
  ctx.tFirstPage = now();
  ctx.stopReason = 'same-host upgrade: the destination maps the memory itself';
  return 'stop-and-copy';
}

async function stopAndCopyAndActivate(ctx: SourceContext): Promise<Ending> {
  const stopped = await stopAndCopy(ctx);
  const a = await commitAndActivate(ctx, stopped);
  ctx.enter('done');
  // closing first tells the destination we heard ACTIVATED (it need not wait for a RESOLVE)
  await ctx.session.conn.finish();
  // tracking stops after the hand-over: the guest is paused, and undoing write protection
  // walks the whole range (kernel work that has no place in the pause)
  await ctx.session.tracker.stop();
  const downtimeMs = a.tActive - stopped.tStopped;
  ctx.progress({ type: 'activated', downtime_ms: downtimeMs });
  return {
    mode: 'precopy',
    digest: a.digest,
    totalMs: a.tActive - ctx.tFirstPage,
    downtimeMs,
    stopAndCopy: {
      pages: stopped.lastPages,
      bytes: stopped.lastBytes,
      pause_ms: +(stopped.tPaused - stopped.tPause).toFixed(3),
      ...(stopped.tStopped > stopped.tPause ? { ran_after_pause_ms: +(stopped.tStopped - stopped.tPause).toFixed(3) } : {}),
      final_collect_ms: +(stopped.tCollected - stopped.tPaused).toFixed(3),
      send_ms: +(a.tSent - stopped.tCollected).toFixed(3),
      commit_ms: +(a.tCommitted - a.tSent).toFixed(3),
      activate_ms: +a.activateMs.toFixed(3),
      ...(ctx.settings.options.disks?.length ? { disk_blocks: ctx.finalDiskBlocks } : {}),
    },
  };
}
