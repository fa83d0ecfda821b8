/** livemig migrate: ask a daemon to migrate one of its guests. */
import { CLIENT_FLAGS, request, targetFrom } from '../daemon-client.js';
import { usageError, type Command, type FlagValues } from '../flags.js';
import { parseHostPort, parseNumber } from '../units.js';
import { followMigration } from './watch.js';

export const migrate: Command = {
  name: 'migrate',
  summary: 'ask a daemon to migrate one of its registered guests',
  synopsis: 'GUEST --to HOST:PORT [--api ...] [--follow] [flags]',
  description: [
    'Asks the daemon (`livemig serve`) to migrate its registered guest GUEST to the daemon whose',
    'migration port is HOST:PORT. Prints the migration id once the destination has taken it',
    '(its handshake), or the error if it refused before any page moved (the guest runs on here).',
    'With --follow it then follows the migration as `livemig watch` does and exits 0 only when',
    'it completed.',
  ].join('\n'),
  positionals: true,
  flags: {
    to: { type: 'string', value: 'HOST:PORT', help: "the destination daemon's migration port (required)" },
    'peer-name': { type: 'string', value: 'NAME', help: "the destination's certificate name (daemons with certificates)" },
    mode: { type: 'string', default: 'precopy', value: 'precopy|postcopy|hybrid', help: 'how the memory moves' },
    'downtime-limit': { type: 'string', value: 'MS', help: 'the pause pre-copy aims under (default 50)' },
    bandwidth: { type: 'string', value: 'MiB/s', help: 'this migration’s bandwidth cap in pre-copy (default none; the daemon’s total cap still applies)' },
    'postcopy-bandwidth': { type: 'string', value: 'MiB/s', help: 'its post-copy push’s own cap (default none)' },
    deadline: { type: 'string', value: 'SECONDS', help: 'done by then, or the guest stays here' },
    'on-stall': { type: 'string', value: 'throttle|postcopy|force|abort', help: 'what to do when pre-copy does not converge' },
    'no-encodings': { type: 'boolean', default: false, help: 'send every page raw' },
    follow: { type: 'boolean', default: false, help: 'follow the migration until it ends' },
    ...CLIENT_FLAGS,
  },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length !== 1) throw usageError("migrate needs one GUEST name (see 'livemig migrate --help')");
    if (typeof v['to'] !== 'string') throw usageError('migrate needs --to HOST:PORT');
    const to = parseHostPort(v['to'], '--to');
    const mode = String(v['mode']);
    if (!['precopy', 'postcopy', 'hybrid'].includes(mode)) throw usageError(`--mode must be precopy, postcopy or hybrid, got '${mode}'`);
    const onStall = v['on-stall'];
    if (onStall !== undefined && !['throttle', 'postcopy', 'force', 'abort'].includes(String(onStall)))
      throw usageError(`--on-stall must be throttle, postcopy, force or abort, got '${String(onStall)}'`);
    const num = (flag: string): number | undefined => (typeof v[flag] === 'string' ? parseNumber(v[flag] as string, `--${flag}`, Number.MIN_VALUE) : undefined);
    const body = {
      guest: args[0],
      to: { ...to, ...(typeof v['peer-name'] === 'string' ? { peer_name: v['peer-name'] } : {}) },
      mode,
      ...(num('downtime-limit') !== undefined ? { downtime_limit_ms: num('downtime-limit') } : {}),
      ...(num('bandwidth') !== undefined ? { bandwidth_mib_s: num('bandwidth') } : {}),
      ...(num('postcopy-bandwidth') !== undefined ? { postcopy_bandwidth_mib_s: num('postcopy-bandwidth') } : {}),
      ...(num('deadline') !== undefined ? { deadline_s: num('deadline') } : {}),
      ...(onStall !== undefined ? { on_stall: onStall } : {}),
      ...(v['no-encodings'] === true ? { encodings: false } : {}),
    };
    const t = targetFrom(v);
    const { body: created } = await request<{ id: string; state: string }>(t, 'POST', '/v1/migrations', body);
    process.stdout.write((v['json'] === true ? JSON.stringify(created) : `migration ${created.id} ${created.state}`) + '\n');
    if (v['follow'] !== true) return 0;
    return followMigration(t, created.id, { json: v['json'] === true });
  },
};
