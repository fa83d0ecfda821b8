/** livemig guest: a reference guest as a process of its own, serving livemig at a socket. */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { referenceGuestArgs } from '../../workload/controller.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { GUEST_FLAGS, guestSpec } from '../migration-flags.js';

export const guest: Command = {
  name: 'guest',
  summary: 'run a reference guest that waits for livemig at a socket',
  synopsis: '--socket PATH [--size SIZE --content C --rate MiB/s --pattern P] [flags]',
  description: [
    'Starts the reference guest (docs/CONTENT.md) as a process of its own: it fills its memory,',
    'writes at --rate and serves livemig at the unix socket PATH (docs/GUEST.md), so that',
    '`livemig send --guest PATH --to HOST:PORT` can migrate it while it runs. Prints',
    '{guest: {socket, pid, bytes}} once it serves. It runs until it is migrated away (it then',
    'exits 0) or stopped (SIGTERM). A failed migration leaves it running, ready for the next.',
  ].join('\n'),
  flags: {
    socket: { type: 'string', value: 'PATH', help: 'the unix socket to serve livemig at (required; "@name": abstract, reachable by any local process)' },
    heartbeat: { type: 'string', value: 'HOST:PORT', help: 'send a UDP heartbeat every millisecond there (default none)' },
    seed: { type: 'string', default: '1', value: 'N', help: 'the content and write stream seed' },
    'no-track': { type: 'boolean', default: false, help: 'register no write tracking (livemig then hashes every page)' },
    ...GUEST_FLAGS,
  },
  async run(v: FlagValues): Promise<number> {
    if (typeof v['socket'] !== 'string' || v['socket'].length === 0) throw usageError("guest needs --socket PATH (see 'livemig guest --help')");
    const seed = str(v, 'seed');
    if (!/^[0-9]{1,19}$/.test(seed)) throw usageError(`--seed must be a decimal integer, got '${seed}'`);
    const argv = referenceGuestArgs(str(v, 'socket'), {
      ...guestSpec(v),
      seed: BigInt(seed),
      ...(typeof v['heartbeat'] === 'string' ? { heartbeat: v['heartbeat'] } : {}),
      noTrack: v['no-track'] === true,
    });
    const child = spawn(argv[0]!, [...argv.slice(1), '--announce'], { stdio: 'inherit' });
    const forward = (sig: NodeJS.Signals): void => void child.kill(sig);
    process.on('SIGINT', forward);
    process.on('SIGTERM', forward);
    const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
    return code ?? (signal === 'SIGTERM' || signal === 'SIGINT' ? 0 : 1);
  },
};
