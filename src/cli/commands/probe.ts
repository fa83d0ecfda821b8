/** livemig probe: which dirty-tracking backends work on this kernel, and why not. */
import { probe as probeTrackers } from '../../tracking/probe.js';
import type { Command, FlagValues } from '../flags.js';

export const probe: Command = {
  name: 'probe',
  summary: 'which dirty-tracking backends work on this kernel, and why not',
  synopsis: '[--json]',
  description: 'Tries each dirty-tracking backend on a small region and prints whether it works here and why (or why not).',
  flags: { json: { type: 'boolean', default: false, help: 'one JSON line' } },
  async run(v: FlagValues): Promise<number> {
    const result = probeTrackers();
    if (v['json'] === true) process.stdout.write(JSON.stringify(result) + '\n');
    else for (const p of result) process.stdout.write(`${p.available ? 'yes' : 'no '}  ${p.backend.padEnd(11)} ${p.reason}\n`);
    return 0;
  },
};
