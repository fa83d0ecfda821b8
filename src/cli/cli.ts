/** The `livemig` command: dispatch, help, and how failures are printed and exit. */
import { LivemigError } from '../errors.js';
import { preferShortSlices } from '../sched.js';
import { demo } from './commands/demo.js';
import { guest } from './commands/guest.js';
import { guests } from './commands/guests.js';
import { keys } from './commands/keys.js';
import { probe } from './commands/probe.js';
import { resolve } from './commands/resolve.js';
import { receive } from './commands/receive.js';
import { send } from './commands/send.js';
import { serve } from './commands/serve.js';
import { migrate } from './commands/migrate.js';
import { cancel, postcopy, set, status } from './commands/status.js';
import { watch } from './commands/watch.js';
import { USAGE_EXIT, commandHelp, commandUsage, isUsageError, parseFlags, type Command } from './flags.js';
import { guardOutput } from './output.js';

const COMMANDS: readonly Command[] = [demo, receive, send, guest, serve, guests, migrate, status, watch, cancel, postcopy, set, probe, keys, resolve];
/** commands that only talk to a daemon: no hand-over runs in their process */
const CLIENTS: readonly Command[] = [probe, keys, resolve, guests, migrate, status, watch, cancel, postcopy, set];
/** `livemig help X` for these words is the global usage */
const HELP_WORDS = ['help', '--help', '-h'];

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
  if (HELP_WORDS.includes(name)) {
    const word = rest[0] === undefined || HELP_WORDS.includes(rest[0]) ? undefined : rest[0];
    const about = word === undefined ? undefined : COMMANDS.find((c) => c.name === word);
    if (word !== undefined && !about) {
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
  try {
    const parsed = parseFlags(cmd, rest);
    if (parsed === 'help') {
      process.stdout.write(commandHelp(cmd));
      return 0;
    }
    if (!CLIENTS.includes(cmd)) latencyHint();
    return await cmd.run(parsed.values, parsed.positionals);
  } catch (e) {
    // a mistake in the command line: the error on its own line, then how the command is used
    if (!(e instanceof LivemigError) || e.phase !== 'usage') throw e;
    process.stderr.write(`livemig: ${e.code} (usage): ${e.message}\n${commandUsage(cmd, e.message)}`);
    return USAGE_EXIT;
  }
}

guardOutput();
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
