/** livemig watch: follow a migration's events, with a progress bar. */
import { LivemigError } from '../../errors.js';
import { CLIENT_FLAGS, followEvents, targetFrom, type ApiTarget } from '../daemon-client.js';
import { usageError, type Command, type FlagValues } from '../flags.js';
import { ProgressBar, type ShownProgress } from '../progress-bar.js';

/**
 * Follows migration `id` until it ends: JSON lines (every event) or the bar and one line per
 * state change and round. Returns the exit status: 0 completed, 1 otherwise.
 */
export async function followMigration(t: ApiTarget, id: string, o: { json: boolean }): Promise<number> {
  const { json } = o;
  const bar = new ProgressBar();
  let final: { state: string; error?: { code: string; message: string; phase?: string } } | undefined;
  let report: unknown;
  await followEvents(t, `/v1/migrations/${encodeURIComponent(id)}/events`, (e) => {
    if (json) process.stdout.write(JSON.stringify({ event: e.event, id: e.id, ...e.data }) + '\n');
    switch (e.event) {
      case 'progress':
        if (!json) bar.show(e.data as unknown as ShownProgress);
        break;
      case 'round':
        if (!json)
          bar.line(
            `round ${String(e.data['round'])}: ${String(e.data['pages'])} pages, ${Number(e.data['mbps']).toFixed(0)} MB/s, ` +
              `${String(e.data['dirty_pages'])} dirty; ${String(e.data['decision'])}`,
          );
        break;
      case 'report':
        report = e.data['report'];
        break;
      case 'state': {
        const state = String(e.data['state']);
        if (!json) bar.line(`state ${state}${e.data['error'] ? `: ${(e.data['error'] as { message: string }).message}` : ''}`);
        if (state === 'completed' || state === 'failed' || state === 'cancelled' || state === 'refused')
          final = { state, ...(e.data['error'] ? { error: e.data['error'] as { code: string; message: string } } : {}) };
        break;
      }
      default:
        break;
    }
    return final !== undefined;
  });
  bar.end();
  if (!final) throw new LivemigError('ERR_LIVEMIG_CONNECTION', `the daemon ended the event stream of ${id} before the migration ended`, { phase: 'api' });
  if (!json && report) process.stdout.write(JSON.stringify(report) + '\n');
  if (final.state !== 'completed' && !json) {
    const err = final.error;
    process.stderr.write(`livemig: migration ${id} ${final.state}${err ? `: ${err.code} (${err.phase ?? '?'}): ${err.message}` : ''}\n`);
  }
  return final.state === 'completed' ? 0 : 1;
}

export const watch: Command = {
  name: 'watch',
  summary: "follow a migration's events on a daemon",
  synopsis: 'ID [--api ...] [--json]',
  description: [
    'Follows the migration ID on the daemon (`livemig serve`) until it ends, on stderr: its',
    'rounds and state changes as lines, and its progress (percentage, region bytes left of the',
    'whole, bytes sent and on the wire, throughput, dirty rate, expected pause, post-copy pages',
    'left, ETA) as one line redrawn in place on a terminal, or a plain line per sample otherwise.',
    'Then prints its report as JSON on stdout. With --json every event is a JSON line on stdout.',
    'Exits 0 when it completed.',
  ].join('\n'),
  positionals: true,
  flags: { ...CLIENT_FLAGS },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length !== 1) throw usageError("watch needs one migration ID (see 'livemig watch --help')");
    return followMigration(targetFrom(v), args[0]!, { json: v['json'] === true });
  },
};
