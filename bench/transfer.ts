/**
 * bench/transfer: the data path alone. A receiver in a child process, a source region filled
 * with random pages in this process, no guest: one migration (first pass + stop-and-copy of
 * nothing), with the CPU each side used, against a raw-TCP ceiling measured in the same run.
 * With --secure both ends authenticate with a pre-shared key and the stream is encrypted.
 *   node dist/bench/transfer.js [--size 1GiB] [--runs 5] [--encodings off|zero|dedup|all] [--content random|mixed|...] [--secure]
 */
import { fork } from 'node:child_process';
import { parseArgs } from 'node:util';
import { fillContent, type ContentName } from '../src/workload/content.js';
import { migrate } from '../src/source/migrate.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { emit, machine, median } from './common.js';
import { rawTcpCeiling } from './raw-tcp.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: String(1 << 30) },
    runs: { type: 'string', default: '5' },
    child: { type: 'boolean', default: false },
    encodings: { type: 'string', default: 'off' },
    content: { type: 'string', default: 'random' },
    secure: { type: 'boolean', default: false },
  },
});
const credentials = values.secure ? ({ kind: 'psk', identity: 'bench', key: Buffer.alloc(32, 0x42) } as const) : undefined;
const size = Number(values.size);

const cpu = (u: NodeJS.ResourceUsage): number => (u.userCPUTime + u.systemCPUTime) / 1e6;

if (values.child) {
  // CPU from the region reserved (populated) to the report: what receiving the pages cost
  let reserved: NodeJS.ResourceUsage | undefined;
  const rx = await listen('127.0.0.1', 0, {
    activate: async () => undefined,
    onReserved: () => void (reserved = process.resourceUsage()),
    ...(credentials ? { credentials } : {}),
  });
  process.send!({ port: rx.port });
  for (;;) {
    const before = process.resourceUsage();
    const r = await rx.next();
    const after = process.resourceUsage();
    const from = reserved ?? before;
    process.send!({
      report: r,
      cpu_s: cpu(after) - cpu(before),
      user_s: (after.userCPUTime - before.userCPUTime) / 1e6,
      receiving_cpu_s: cpu(after) - cpu(from),
    });
  }
} else {
  function encodings(v: string): { zero: boolean; dedup: boolean; compress: boolean } {
    const on = (x: string): boolean => v === 'all' || v === x;
    return { zero: on('zero'), dedup: on('dedup'), compress: v === 'all' };
  }
  emit({ bench: 'transfer', case: 'machine', ...machine(), region_bytes: size });
  const ceiling = median([await rawTcpCeiling(size), await rawTcpCeiling(size), await rawTcpCeiling(size)]);
  emit({ bench: 'transfer', case: 'raw_tcp_ceiling', ms: +ceiling.toFixed(1), mb_s: +(size / 1e3 / ceiling).toFixed(0), runs: 3 });
  const region = Region.create(size, { name: 'bench-source' });
  await fillContent(region, values.content as ContentName, 1n);
  const child = fork(process.argv[1]!, ['--child', ...(values.secure ? ['--secure'] : [])], { stdio: 'inherit' });
  const messages: any[] = [];
  let wake: () => void = () => undefined;
  child.on('message', (m) => {
    messages.push(m);
    wake();
  });
  const nextMsg = async (): Promise<any> => {
    while (messages.length === 0) await new Promise<void>((r) => (wake = r));
    return messages.shift();
  };
  const { port } = await nextMsg();
  const passes: number[] = [];
  for (let i = 0; i < Number(values.runs); i++) {
    const before = process.resourceUsage();
    const rep = await migrate({
      region,
      to: { host: '127.0.0.1', port },
      pause: async () => new Uint8Array(8),
      resume: async () => undefined,
      maxRounds: 1,
      encodings: encodings(values.encodings!),
      ...(credentials ? { credentials } : {}),
    });
    const after = process.resourceUsage();
    const rx = await nextMsg();
    const pass = rep.per_round[0]!.duration_ms;
    passes.push(pass);
    emit({
      bench: 'transfer',
      case: 'run',
      run: i,
      first_pass_ms: pass,
      mb_s: +(size / 1e3 / pass).toFixed(0),
      ratio_to_raw_tcp: +(ceiling / pass).toFixed(3),
      prep_ms: rep.prep_ms,
      sender_cpu_s: +(cpu(after) - cpu(before)).toFixed(3),
      receiver_cpu_s: +rx.cpu_s.toFixed(3),
      receiver_user_s: +rx.user_s.toFixed(3),
      receiver_cpu_after_reserve_s: +rx.receiving_cpu_s.toFixed(3),
    });
  }
  const p = median(passes);
  emit({
    bench: 'transfer',
    case: 'first_pass',
    first_pass_ms: p,
    mb_s: +(size / 1e3 / p).toFixed(0),
    ratio_to_raw_tcp: +(ceiling / p).toFixed(3),
    runs: passes.length,
  });
  child.kill();
  region.release();
}
