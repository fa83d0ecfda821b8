/**
 * bench/e2e: a 1 GiB guest migrated on loopback, against baselines measured in the same run:
 * the raw-TCP ceiling (the same socket setup, a receiver process, 1 MiB writes of the same
 * byte count) and a naive stop-and-copy (pause, send everything once, resume there).
 *   node dist/bench/e2e.js [--size 1GiB] [--runs 5]
 */
import { spawn } from 'node:child_process';
import net from 'node:net';
import { parseArgs } from 'node:util';
import { runDemo, type DemoReport } from '../src/cli/commands.js';
import { emit, machine, median } from './common.js';

const { values } = parseArgs({ options: { size: { type: 'string', default: String(1 << 30) }, runs: { type: 'string', default: '5' }, sink: { type: 'boolean', default: false } } });
const size = Number(values.size);
const runs = Number(values.runs);

if (values.sink) {
  // child: accept one connection, count bytes, answer one byte when `size` bytes arrived
  const server = net.createServer({ noDelay: true }, (s) => {
    let n = 0;
    s.on('data', (c: Buffer) => {
      n += c.length;
      if (n >= size) s.end(Buffer.of(1));
    });
  });
  server.listen(0, '127.0.0.1', () => process.stdout.write(`${(server.address() as net.AddressInfo).port}\n`));
} else {
  emit({ bench: 'e2e', case: 'machine', ...machine(), region_bytes: size });
  const ceilings: number[] = [];
  for (let i = 0; i < 3; i++) ceilings.push(await rawTcp());
  const ceiling = median(ceilings);
  emit({ bench: 'e2e', case: 'raw_tcp_ceiling', bytes: size, ms: +ceiling.toFixed(1), mb_s: +(size / 1e3 / ceiling).toFixed(0), runs: 3 });

  const g = (content: string, rate: number) => ({ size, content, rate, pattern: 'uniform', hotSize: 64 << 20 });
  const idle: DemoReport[] = [];
  for (let i = 0; i < 3; i++) idle.push(await runDemo(g('random', 0), 50, 30));
  const firstPass = median(idle.map((r) => r.per_round[0]!.duration_ms));
  emit({
    bench: 'e2e',
    case: 'idle_random_first_pass',
    first_pass_ms: firstPass,
    mb_s: +(size / 1e3 / firstPass).toFixed(0),
    ratio_to_raw_tcp: +(ceiling / firstPass).toFixed(3),
    total_ms: median(idle.map((r) => r.total_ms)),
    prep_ms: median(idle.map((r) => r.prep_ms)),
    verified: idle.every((r) => r.verified),
    runs: 3,
  });

  const naive: DemoReport[] = [];
  for (let i = 0; i < 3; i++) naive.push(await runDemo(g('mixed', 64), 50, 1, undefined, true));
  emit({ bench: 'e2e', case: 'naive_stop_and_copy_mixed_64', downtime_ms: median(naive.map((r) => r.downtime_ms)), guest_gap_ms: median(naive.map((r) => r.guest_gap_ms)), total_ms: median(naive.map((r) => r.total_ms)), verified: naive.every((r) => r.verified), runs: 3 });

  const live: DemoReport[] = [];
  for (let i = 0; i < runs; i++) {
    const r = await runDemo(g('mixed', 64), 50, 30);
    live.push(r);
    emit({ bench: 'e2e', case: 'livemig_mixed_64_run', run: i, downtime_ms: r.downtime_ms, guest_gap_ms: r.guest_gap_ms, total_ms: r.total_ms, rounds: r.rounds, wire_bytes: r.wire_bytes, stop_and_copy: r.stop_and_copy, verified: r.verified });
  }
  const dt = median(live.map((r) => r.downtime_ms));
  emit({
    bench: 'e2e',
    case: 'livemig_mixed_64',
    downtime_ms: dt,
    guest_gap_ms: median(live.map((r) => r.guest_gap_ms)),
    total_ms: median(live.map((r) => r.total_ms)),
    prep_ms: median(live.map((r) => r.prep_ms)),
    rounds: median(live.map((r) => r.rounds)),
    wire_bytes_over_region: +(median(live.map((r) => r.wire_bytes)) / size).toFixed(3),
    downtime_vs_naive: +(median(naive.map((r) => r.downtime_ms)) / dt).toFixed(1),
    verified: live.every((r) => r.verified),
    runs,
  });
}

async function rawTcp(): Promise<number> {
  const sink = spawn(process.execPath, [process.argv[1]!, '--sink', '--size', String(size)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve) => sink.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
  const sock = net.connect({ port, host: '127.0.0.1', noDelay: true });
  await new Promise((r) => sock.once('connect', r));
  const bufs = Array.from({ length: 4 }, () => Buffer.alloc(1 << 20, 0x5a));
  const t0 = performance.now();
  const done = new Promise((r) => sock.once('data', r));
  for (let sent = 0, i = 0; sent < size; sent += 1 << 20, i++) {
    if (!sock.write(bufs[i % 4]!)) await new Promise((r) => sock.once('drain', r));
  }
  await done;
  const ms = performance.now() - t0;
  sock.destroy();
  sink.kill();
  return ms;
}
