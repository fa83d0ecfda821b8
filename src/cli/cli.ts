/** The `livemig` command: dispatch, help, and how failures are printed and exit. */
import { LivemigError } from '../errors.js';
import { preferShortSlices } from '../sched.js';
import { demo } from './commands/demo.js';
import { guest } from './commands/guest.js';
import { keys } from './commands/keys.js';
import { probe } from './commands/probe.js';
import { resolve } from './commands/resolve.js';
import { receive } from './commands/receive.js';
import { send } from './commands/send.js';
import { serve } from './commands/serve.js';
import { migrate } from './commands/migrate.js';
import { cancel, set, status } from './commands/status.js';
import { watch } from './commands/watch.js';
import { USAGE_EXIT, commandHelp, isUsageError, parseFlags, type Command } from './flags.js';

const COMMANDS: readonly Command[] = [demo, receive, send, guest, serve, migrate, status, watch, cancel, set, probe, keys, resolve];
/** commands that only talk to a daemon: no hand-over runs in their process */
const CLIENTS: readonly Command[] = [probe, keys, resolve, migrate, status, watch, cancel, set];

function globalUsage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.name.length)) + 2;
  return [
    'usage: livemig <command> [flags]',
    '',
    'commands:',
    ...COMMANDS.map((c) => `  ${c.name.padEnd(width)}${c.summary}`),
    `  ${'help'.padEnd(width)}this text, or a command's own: livemig help <command>, livemig <command> --help`,
    '',
    'exit codes: 0 done, 1 the migration (or the check) failed, 2 a usage error (or off loopback without credentials)',
    '',
  ].join('\n');
}

/** livemig's own processes hand guests over: their threads ask for short slices (src/sched.ts). */
function latencyHint(): void {
  if (process.env['LIVEMIG_SLICE_US'] === '0') return;
  preferShortSlices(process.env['LIVEMIG_SLICE_US'] ? Number(process.env['LIVEMIG_SLICE_US']) : undefined);
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    process.stderr.write(globalUsage());
    return USAGE_EXIT;
  }
  if (name === 'help' || name === '--help' || name === '-h') {
    const about = rest[0] === undefined ? undefined : COMMANDS.find((c) => c.name === rest[0]);
    if (rest[0] !== undefined && !about) {
      process.stderr.write(`livemig: unknown command '${rest[0]}'\n${globalUsage()}`);
      return USAGE_EXIT;
    }
    process.stdout.write(about ? commandHelp(about) : globalUsage());
    return 0;
  }
  const cmd = COMMANDS.find((c) => c.name === name);
  if (!cmd) {
    process.stderr.write(`livemig: unknown command '${name}'\n${globalUsage()}`);
    return USAGE_EXIT;
  }
  const parsed = parseFlags(cmd, rest);
  if (parsed === 'help') {
    process.stdout.write(commandHelp(cmd));
    return 0;
  }
  if (!CLIENTS.includes(cmd)) latencyHint();
  return cmd.run(parsed.values, parsed.positionals);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (e instanceof LivemigError) {
      process.stderr.write(`livemig: ${e.code} (${e.phase ?? process.argv[2] ?? 'livemig'}): ${e.message}\n`);
      process.exitCode = isUsageError(e) ? USAGE_EXIT : 1;
    } else {
      process.stderr.write(`livemig: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
      process.exitCode = 1;
    }
  },
);
