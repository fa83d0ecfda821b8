/** livemig guests: the guests registered with a daemon, or one of them. */
import path from 'node:path';
import { CLIENT_FLAGS, request, targetFrom } from '../daemon-client.js';
import { usageError, type Command, type FlagValues } from '../flags.js';

interface GuestView {
  name: string;
  kind?: string;
  pid: number;
  state: string;
  bytes: number;
  tracking: string;
  regions: unknown[];
  registered_at: string;
  migration?: string;
}

/** One guest as a line; what the daemon sent is printed as text whatever its type. */
function line(g: GuestView): string {
  const mib = `${(Number(g.bytes) / 2 ** 20).toFixed(0)} MiB`;
  const regions = Array.isArray(g.regions) ? g.regions.length : 0;
  const kind = g.kind === 'qemu' ? '  qemu' : '';
  return (
    `${String(g.name).padEnd(20)} pid ${String(g.pid).padEnd(8)} ${String(g.state).padEnd(9)} ${mib.padStart(10)} in ${regions} ` +
    `region${regions === 1 ? ' ' : 's'}  tracking ${String(g.tracking)}${kind}${g.migration ? `  migration ${String(g.migration)}` : ''}`
  );
}

export const guests: Command = {
  name: 'guests',
  summary: 'the guests registered with a daemon, or one of them',
  synopsis: '[NAME] | --register NAME --qemu QMP_SOCKET | --unregister NAME [--api ...] [--json]',
  description: [
    'Without NAME, lists the guests registered with the daemon (`livemig serve`), one per line:',
    'name, pid, state (idle, or migrating and the migration id), memory, regions and how their',
    'writes are tracked; with --json one object per line. With NAME, prints that guest (JSON).',
    'A registered guest is what `livemig migrate NAME --to HOST:PORT` moves. With --register',
    'NAME --qemu QMP_SOCKET the daemon registers the running QEMU VM at that QMP socket (checked',
    'as `livemig send --qemu` checks it: docs/QEMU.md) and prints it; --unregister NAME lets a',
    'QEMU VM go from the list (it runs on).',
  ].join('\n'),
  positionals: true,
  flags: {
    register: { type: 'string', value: 'NAME', help: 'register a QEMU VM under NAME (with --qemu)' },
    qemu: { type: 'string', value: 'QMP_SOCKET', help: "with --register: the VM's QMP socket, an absolute path as the daemon's host sees it" },
    unregister: { type: 'string', value: 'NAME', help: 'unregister the QEMU VM NAME (it runs on, untouched)' },
    ...CLIENT_FLAGS,
  },
  async run(v: FlagValues, args: string[]): Promise<number> {
    if (args.length > 1) throw usageError('guests takes at most one guest NAME');
    const t = targetFrom(v);
    const register = typeof v['register'] === 'string' ? v['register'] : undefined;
    const unregister = typeof v['unregister'] === 'string' ? v['unregister'] : undefined;
    if ((register !== undefined) !== (typeof v['qemu'] === 'string')) throw usageError('--register NAME and --qemu QMP_SOCKET go together');
    if (register !== undefined || unregister !== undefined) {
      if (args.length > 0 || (register !== undefined && unregister !== undefined)) throw usageError('--register and --unregister each take the NAME alone');
      const { body } =
        register !== undefined
          ? await request(t, 'POST', '/v1/guests', { name: register, qemu: { qmp: path.resolve(String(v['qemu'])) } })
          : await request(t, 'DELETE', `/v1/guests/${encodeURIComponent(unregister!)}`);
      process.stdout.write(JSON.stringify(body, null, v['json'] === true ? undefined : 2) + '\n');
      return 0;
    }
    if (args.length === 1) {
      const { body } = await request(t, 'GET', `/v1/guests/${encodeURIComponent(args[0]!)}`);
      process.stdout.write(JSON.stringify(body, null, v['json'] === true ? undefined : 2) + '\n');
      return 0;
    }
    const { body } = await request<{ guests: GuestView[] }>(t, 'GET', '/v1/guests');
    if (v['json'] === true) for (const g of body.guests) process.stdout.write(JSON.stringify(g) + '\n');
    else if (body.guests.length === 0) process.stdout.write('no guests registered\n');
    else for (const g of body.guests) process.stdout.write(line(g) + '\n');
    return 0;
  },
};
