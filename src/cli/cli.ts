/** The `livemig` command. */
import { LivemigError } from '../errors.js';
import { probe } from '../tracking/probe.js';
import { preferShortSlices } from '../sched.js';
import { demoCommand, receiveCommand, sendCommand } from './commands.js';

const USAGE = `usage: livemig <command> [options]

commands:
  demo [flags]                 migrate a reference guest live on loopback and report
  receive --listen HOST:PORT   serve one migration; the reference guest resumes here
  send --to HOST:PORT [flags]  start a reference guest here and migrate it to a receiver
  probe [--json]               which dirty-tracking backends work on this kernel, and why not

guest flags (demo, send): --size 1GiB --content mixed|random|zero|text|dup --rate 64 (MiB/s)
  --pattern uniform|hot|sequential --hot-size 64MiB --downtime-limit 50 (ms) --max-rounds 30 --json
  --no-zero --no-dedup --no-compress   switch page encodings off (each is on by default)
  --on-stall throttle|postcopy|force|abort   when pre-copy does not converge (default throttle)
  --bandwidth MiB/s   cap, enforced smoothly   --deadline SECONDS   done or given up by then
  --mode precopy|postcopy|hybrid   post-copy: the guest moves at once, pages follow on demand
  --no-wws   send hot pages every round   --rate-adapt START:INC (MiB/s)   --max-bytes SIZE (default 3x)
receive flags: --max-region SIZE --reuse-image PATH (an image this host kept: send only what differs) --json
`;

/** livemig's own processes hand guests over: their threads ask for short slices (src/sched.ts). */
function latencyHint(): void {
  if (process.env['LIVEMIG_SLICE_US'] === '0') return;
  preferShortSlices(process.env['LIVEMIG_SLICE_US'] ? Number(process.env['LIVEMIG_SLICE_US']) : undefined);
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command !== undefined && (rest.includes('--help') || rest.includes('-h'))) {
    process.stdout.write(USAGE);
    return 0;
  }
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
    case 'demo':
      latencyHint();
      return demoCommand(rest);
    case 'receive':
      latencyHint();
      return receiveCommand(rest);
    case 'send':
      latencyHint();
      return sendCommand(rest);
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
    else if ((e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) process.stderr.write(`livemig: ${(e as Error).message}\n${USAGE}`);
    else process.stderr.write(`livemig: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    process.exitCode = 1;
  },
);
