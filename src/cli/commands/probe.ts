/** livemig probe: which dirty-tracking backends work on this kernel, and why not; kernel TLS; huge pages; disks. */
import { probeDisk } from '../../disk/probe.js';
import { probeHugePages } from '../../region/huge-pages.js';
import { probeKernelTls } from '../../security/transport-probe.js';
import { probe as probeTrackers } from '../../tracking/probe.js';
import { str, type Command, type FlagValues } from '../flags.js';

export const probe: Command = {
  name: 'probe',
  summary: 'which dirty-tracking backends work on this kernel, and why not; kernel TLS; huge pages; disks',
  synopsis: '[--disk-dir DIR] [--json]',
  description: [
    'Tries each dirty-tracking backend on a small region and prints whether it works here and why',
    '(or why not); then whether the kernel offers TLS offload, and why livemig does not use it; then',
    'whether a guest can have huge pages here now (--huge-pages hugetlb: free pages in the pool; thp: the',
    'shmem THP policy); then what disk images in --disk-dir would have: clones (reflink write tracking),',
    'extent maps (FIEMAP) and fanotify pre-content events (disk post-copy), each tried on a scratch file.',
    'With --json: one line, {tracking: [{backend, available, reason}], kernel_tls: {available, used, reason},',
    'huge_pages: [{kind, available, reason}], disk: [{feature, available, reason}]}.',
  ].join('\n'),
  flags: {
    'disk-dir': { type: 'string', default: '.', value: 'DIR', help: 'where disk images would live: the disk features are tried on its filesystem' },
    json: { type: 'boolean', default: false, help: 'one JSON line' },
  },
  async run(v: FlagValues): Promise<number> {
    const tracking = probeTrackers();
    const kernelTls = probeKernelTls();
    const hugePages = probeHugePages();
    const disk = await probeDisk(str(v, 'disk-dir'));
    if (v['json'] === true) {
      process.stdout.write(JSON.stringify({ tracking, kernel_tls: kernelTls, huge_pages: hugePages, disk }) + '\n');
      return 0;
    }
    for (const p of tracking) process.stdout.write(`${p.available ? 'yes' : 'no '}  ${p.backend.padEnd(11)} ${p.reason}\n`);
    process.stdout.write(`${kernelTls.available ? 'yes' : 'no '}  ${'kernel-tls'.padEnd(11)} ${kernelTls.reason}\n`);
    for (const h of hugePages) process.stdout.write(`${h.available ? 'yes' : 'no '}  ${`huge ${h.kind}`.padEnd(11)} ${h.reason}\n`);
    for (const d of disk) process.stdout.write(`${d.available ? 'yes' : 'no '}  ${`disk ${d.feature}`.padEnd(11)} ${d.reason}\n`);
    return 0;
  },
};
