/** livemig guest: a reference guest as a process of its own, serving livemig at a socket. */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { referenceGuestArgs, referenceGuestRegisterArgs } from '../../workload/controller.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { whenStdoutCloses } from '../output.js';
import { BEAT_FLAG, DISK_FLAGS, GUEST_FLAGS, beatMs, diskSpec, guestSpec } from '../migration-flags.js';

export const guest: Command = {
  name: 'guest',
  summary: 'run a reference guest that waits for livemig at a socket',
  synopsis: '--socket PATH | --register PATH --name NAME [--size SIZE --content C --rate MiB/s --pattern P] [flags]',
  description: [
    'Starts the reference guest (docs/CONTENT.md) as a process of its own: it fills its memory,',
    'writes at --rate and serves livemig at the unix socket PATH (docs/GUEST.md), so that',
    '`livemig send --guest PATH --to HOST:PORT` can migrate it while it runs. Prints',
    '{guest: {socket, pid, bytes}} once it serves. It runs until it is migrated away (it then',
    'exits 0) or stopped (SIGTERM). A failed migration leaves it running, ready for the next.',
    'With --register it listens nowhere: it registers with the `livemig serve` daemon whose',
    'guest socket is PATH (`livemig serve --guests PATH`) and is listed there as NAME, so that',
    '`livemig migrate NAME --to HOST:PORT` moves it; it dials again if the daemon restarts.',
  ].join('\n'),
  flags: {
    socket: { type: 'string', value: 'PATH', help: 'the unix socket to serve livemig at ("@name": abstract, reachable by any local process)' },
    register: { type: 'string', value: 'PATH', help: 'register with the daemon whose guest socket this is, instead of serving at --socket' },
    name: { type: 'string', default: 'reference-guest', value: 'NAME', help: 'the name the daemon lists this guest by (1..63 of [A-Za-z0-9._-])' },
    heartbeat: { type: 'string', value: 'HOST:PORT', help: 'send a UDP heartbeat there every --beat-ms (default none)' },
    seed: { type: 'string', default: '1', value: 'N', help: 'the content and write stream seed' },
    'no-track': { type: 'boolean', default: false, help: 'register no write tracking (livemig then hashes every page)' },
    ...GUEST_FLAGS,
    ...DISK_FLAGS,
    'disk-image': { type: 'string', value: 'PATH', help: 'with --disk: where its image is created (replacing a file there)' },
    ...BEAT_FLAG,
  },
  async run(v: FlagValues): Promise<number> {
    const socket = typeof v['socket'] === 'string' && v['socket'].length > 0 ? v['socket'] : undefined;
    const register = typeof v['register'] === 'string' && v['register'].length > 0 ? v['register'] : undefined;
    if ((socket === undefined) === (register === undefined))
      throw usageError("guest needs one of --socket PATH and --register PATH (see 'livemig guest --help')");
    const name = str(v, 'name');
    if (!/^[A-Za-z0-9._-]{1,63}$/.test(name)) throw usageError(`--name must be 1..63 characters of [A-Za-z0-9._-], got '${name}'`);
    const seed = str(v, 'seed');
    if (!/^[0-9]{1,19}$/.test(seed)) throw usageError(`--seed must be a decimal integer, got '${seed}'`);
    const disk = diskSpec(v);
    const image = typeof v['disk-image'] === 'string' ? v['disk-image'] : undefined;
    if ((disk === undefined) !== (image === undefined)) throw usageError('--disk SIZE and --disk-image PATH go together');
    const spec = {
      ...guestSpec(v),
      ...(disk && image ? { diskImage: { ...disk, path: image } } : {}),
      ...beatMs(v),
      seed: BigInt(seed),
      ...(typeof v['heartbeat'] === 'string' ? { heartbeat: v['heartbeat'] } : {}),
      noTrack: v['no-track'] === true,
    };
    const argv = register ? referenceGuestRegisterArgs(register, name, spec) : referenceGuestArgs(socket!, spec);
    // its announce goes through this process's stdout: a reader gone stops the guest in order, as SIGTERM does
    const child = spawn(argv[0]!, [...argv.slice(1), '--announce'], { stdio: ['inherit', 'pipe', 'inherit'] });
    child.stdout.on('data', (b: Buffer) => process.stdout.write(b));
    const forward = (sig: NodeJS.Signals): void => void child.kill(sig);
    whenStdoutCloses(() => forward('SIGTERM'));
    process.on('SIGINT', forward);
    process.on('SIGTERM', forward);
    const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
    return code ?? (signal === 'SIGTERM' || signal === 'SIGINT' ? 0 : 1);
  },
};
