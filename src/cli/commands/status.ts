/** livemig status, cancel, postcopy, set: a daemon's migrations, read and changed. */
import { CLIENT_FLAGS, request, targetFrom } from '../daemon-client.js';
import { usageError, type Command, type FlagValues } from '../flags.js';
import { parseNumber } from '../units.js';

interface View {
  id: string;
  direction: string;
  guest: string;
  peer: string;
  state: string;
  stage: string;
  progress: { percent: number; eta_s?: number };
  error?: { code: string; message: string };
  refusal?: { reason: string };
}

function line(m: View): string {
  const eta = m.progress.eta_s !== undefined && m.state === 'running' ? ` ETA ${m.progress.eta_s.toFixed(1)} s` : '';
  return (
    `${m.id}  ${m.direction.padEnd(8)} ${m.guest.padEnd(16)} ${m.peer.padEnd(21)} ${m.state.padEnd(9)} ${m.stage.padEnd(13)} ` +
    `${m.progress.percent.toFixed(1).padStart(5)}%${eta}${m.refusal ? `  [${m.refusal.reason}]` : ''}${m.error ? `  ${m.error.code}: ${m.error.message}` : ''}`
  );
}

export const status: Command = {
  name: 'status',
  summary: "a daemon's migrations, or one of them",
  synopsis: '[ID] [--api ...] [--json]',
  description: [
    'Without ID, lists the daemon’s migrations (both directions), one per line: id, direction,',
    'guest, peer, state, stage and progress. With ID, prints that migration in full (JSON):',
    'its progress, per-round statistics and, when it is done, its report.',
  ].join('\n'),
  positionals: true,
  flags: { ...CLIENT_FLAGS },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length > 1) throw usageError("status takes at most one migration ID (see 'livemig status --help')");
    const t = targetFrom(v);
    if (args.length === 1) {
      const { body } = await request(t, 'GET', `/v1/migrations/${encodeURIComponent(args[0]!)}`);
      process.stdout.write(JSON.stringify(body, null, v['json'] === true ? undefined : 2) + '\n');
      return 0;
    }
    const { body } = await request<{ migrations: View[] }>(t, 'GET', '/v1/migrations');
    if (v['json'] === true) for (const m of body.migrations) process.stdout.write(JSON.stringify(m) + '\n');
    else if (body.migrations.length === 0) process.stdout.write('no migrations\n');
    else for (const m of body.migrations) process.stdout.write(line(m) + '\n');
    return 0;
  },
};

export const cancel: Command = {
  name: 'cancel',
  summary: 'cancel an outgoing migration before its point of commitment',
  synopsis: 'ID [--api ...] [--json]',
  description:
    'Cancels the outgoing migration ID: the destination discards its copy and the guest keeps running here. Refused (ERR_LIVEMIG_STATE) once it has ' +
    'passed its point of commitment.',
  positionals: true,
  flags: { ...CLIENT_FLAGS },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length !== 1) throw usageError("cancel needs one migration ID (see 'livemig cancel --help')");
    const { body } = await request<View>(targetFrom(v), 'POST', `/v1/migrations/${encodeURIComponent(args[0]!)}/cancel`);
    process.stdout.write((v['json'] === true ? JSON.stringify(body) : `migration ${body.id}: cancel asked (${body.state}, ${body.stage})`) + '\n');
    return 0;
  },
};

export const postcopy: Command = {
  name: 'postcopy',
  summary: 'switch a running outgoing migration to post-copy',
  synopsis: 'ID [--api ...] [--json]',
  description: [
    'Switches the running outgoing migration ID to post-copy at the end of its round: the guest',
    'then runs at the destination at once and its remaining pages follow (on demand, and pushed).',
    'For a pre-copy that does not converge, instead of waiting for --on-stall. The destination',
    'must offer post-copy; refused (ERR_LIVEMIG_STATE) once the migration has ended. Prints the',
    'migration as it stands; `livemig watch ID` follows it to its end.',
  ].join('\n'),
  positionals: true,
  flags: { ...CLIENT_FLAGS },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length !== 1) throw usageError('postcopy needs one migration ID');
    const { body } = await request<View>(targetFrom(v), 'POST', `/v1/migrations/${encodeURIComponent(args[0]!)}/postcopy`);
    process.stdout.write((v['json'] === true ? JSON.stringify(body) : `migration ${body.id}: post-copy asked (${body.state}, ${body.stage})`) + '\n');
    return 0;
  },
};

export const set: Command = {
  name: 'set',
  summary: "change a running migration's bandwidth cap or downtime limit",
  synopsis: 'ID [--bandwidth MiB/s] [--postcopy-bandwidth MiB/s] [--downtime-limit MS] [--api ...] [--json]',
  description:
    'Changes the running outgoing migration ID: its bandwidth cap (from the next chunk) and the downtime limit pre-copy aims under (from the next round).',
  positionals: true,
  flags: {
    bandwidth: { type: 'string', value: 'MiB/s', help: 'the new bandwidth cap of pre-copy' },
    'postcopy-bandwidth': { type: 'string', value: 'MiB/s', help: "the new cap of post-copy's push" },
    'downtime-limit': { type: 'string', value: 'MS', help: 'the new downtime limit' },
    ...CLIENT_FLAGS,
  },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length !== 1) throw usageError("set needs one migration ID (see 'livemig set --help')");
    const change = {
      ...(typeof v['bandwidth'] === 'string' ? { bandwidth_mib_s: parseNumber(v['bandwidth'], '--bandwidth', Number.MIN_VALUE) } : {}),
      ...(typeof v['postcopy-bandwidth'] === 'string'
        ? { postcopy_bandwidth_mib_s: parseNumber(v['postcopy-bandwidth'], '--postcopy-bandwidth', Number.MIN_VALUE) }
        : {}),
      ...(typeof v['downtime-limit'] === 'string' ? { downtime_limit_ms: parseNumber(v['downtime-limit'], '--downtime-limit', Number.MIN_VALUE) } : {}),
    };
    if (Object.keys(change).length === 0) throw usageError('set needs --bandwidth, --postcopy-bandwidth or --downtime-limit');
    const { body } = await request<View & { settings: unknown }>(targetFrom(v), 'PATCH', `/v1/migrations/${encodeURIComponent(args[0]!)}`, change);
    process.stdout.write((v['json'] === true ? JSON.stringify(body) : `migration ${body.id}: ${JSON.stringify(body.settings)}`) + '\n');
    return 0;
  },
};
