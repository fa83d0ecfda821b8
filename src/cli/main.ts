#!/usr/bin/env node
/** The `livemig` command. */
import { LivemigError } from '../errors.js';
import { probe } from '../tracking/probe.js';

const USAGE = `usage: livemig <command> [options]

commands:
  probe [--json]   which dirty-tracking backends work on this kernel, and why not
`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'probe': {
      const result = probe();
      if (rest.includes('--json')) {
        process.stdout.write(JSON.stringify(result) + '\n');
      } else {
        for (const p of result) process.stdout.write(`${p.available ? 'yes' : 'no '}  ${p.backend.padEnd(11)} ${p.reason}\n`);
      }
      return 0;
    }
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      process.stderr.write(`livemig: unknown command '${command}'\n${USAGE}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    if (e instanceof LivemigError) process.stderr.write(`livemig: ${e.code} (${e.phase ?? 'unknown phase'}): ${e.message}\n`);
    else process.stderr.write(`livemig: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exitCode = 1;
  },
);
