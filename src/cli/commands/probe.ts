/** livemig probe: which dirty-tracking backends work on this kernel, and why not; kernel TLS. */
import { probeKernelTls } from '../../security/transport-probe.js';
import { probe as probeTrackers } from '../../tracking/probe.js';
import type { Command, FlagValues } from '../flags.js';

export const probe: Command = {
  name: 'probe',
  summary: 'which dirty-tracking backends work on this kernel, and why not; kernel TLS',
  synopsis: '[--json]',
  description: [
    'Tries each dirty-tracking backend on a small region and prints whether it works here and why',
    '(or why not); then whether the kernel offers TLS offload, and why livemig does not use it.',
    'With --json: one line, {tracking: [{backend, available, reason}], kernel_tls: {available, used, reason}}.',
  ].join('\n'),
  flags: { json: { type: 'boolean', default: false, help: 'one JSON line' } },
  async run(v: FlagValues): Promise<number> {
    const tracking = probeTrackers();
    const kernelTls = probeKernelTls();
    if (v['json'] === true) {
      process.stdout.write(JSON.stringify({ tracking, kernel_tls: kernelTls }) + '\n');
      return 0;
    }
    for (const p of tracking) process.stdout.write(`${p.available ? 'yes' : 'no '}  ${p.backend.padEnd(11)} ${p.reason}\n`);
    process.stdout.write(`${kernelTls.available ? 'yes' : 'no '}  ${'kernel-tls'.padEnd(11)} ${kernelTls.reason}\n`);
    return 0;
  },
};
