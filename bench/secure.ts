/**
 * bench/secure: what the encrypted stream costs (issue 17). The same demo plain (no credentials)
 * and encrypted (mutual TLS from a fresh test CA, every byte in AES-256-GCM records), interleaved
 * in the same run so that a drifting host drifts for both:
 *   - idle_random: the idle `random` guest, whose first pass is pure transfer: its throughput;
 *   - default: the default demo (`mixed`, 64 MiB/s);
 *   - with --link, default_1gbit: the default demo through the 1 Gbit/s namespace link;
 * each with total time, downtime and the CPU seconds of each side's livemig process; and the
 * baselines of the same byte count: the raw TCP stream and Node's own TLS stream.
 *   node dist/bench/secure.js [--size 1GiB] [--runs 5] [--link] [--cases idle_random,default]
 */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport, type ReceiverPlace } from '../src/demo/demo.js';
import { makeTestCa, writeTestCa } from '../src/security/test-ca.js';
import { emit, machine, median } from './common.js';
import { createLink } from './netlink.js';
import { rawTcpCeiling } from './raw-tcp.js';
import { nodeTlsStream } from './tls-stream.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: String(1 << 30) },
    runs: { type: 'string', default: '5' },
    link: { type: 'boolean', default: false },
    cases: { type: 'string', default: 'idle_random,default' },
  },
});
const size = Number(values.size);
const runs = Number(values.runs);
const cases = values.cases!.split(',');
if (values.link) cases.push('default_1gbit');

const range = (xs: number[]) => ({ median: +median(xs).toFixed(2), min: +Math.min(...xs).toFixed(2), max: +Math.max(...xs).toFixed(2) });

interface Sample {
  first_pass_ms: number;
  first_pass_mb_s: number;
  total_ms: number;
  downtime_ms: number;
  /** what the pause carried: the downtime follows it, and it varies with the run */
  stop_pages: number;
  cpu_source_s: number;
  cpu_destination_s: number;
  rounds: number;
  verified: boolean;
  encrypted: boolean;
}

function sample(r: DemoReport): Sample {
  const fp = r.per_round[0]!.duration_ms;
  return {
    first_pass_ms: +fp.toFixed(1),
    first_pass_mb_s: +(r.region_bytes / 1e3 / fp).toFixed(0),
    total_ms: +r.total_ms.toFixed(1),
    downtime_ms: r.downtime_ms,
    stop_pages: r.stop_and_copy.pages,
    cpu_source_s: r.cpu_s.source,
    cpu_destination_s: r.cpu_s.destination,
    rounds: r.rounds,
    verified: r.verified,
    encrypted: r.security.encrypted,
  };
}

emit({ bench: 'secure', case: 'machine', ...machine(), region_bytes: size });

// baselines: the same bytes through a plain socket and through Node's TLS socket, alternating
{
  const ca = makeTestCa(['dst'], 1);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-bench-ca-'));
  try {
    writeTestCa(dir, ca);
    const raw: number[] = [];
    const node: number[] = [];
    let cipher = '';
    for (let i = 0; i < 3; i++) {
      raw.push(await rawTcpCeiling(size));
      const t = await nodeTlsStream(size, dir);
      node.push(t.ms);
      cipher = t.cipher;
    }
    emit({
      bench: 'secure',
      case: 'baseline_streams',
      bytes: size,
      raw_tcp_ms: range(raw),
      node_tls_ms: range(node),
      node_tls_cipher: cipher,
      raw_mb_s: +(size / 1e3 / median(raw)).toFixed(0),
      node_tls_mb_s: +(size / 1e3 / median(node)).toFixed(0),
      node_tls_over_raw_throughput: +(median(raw) / median(node)).toFixed(3),
      runs: 3,
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const name of cases) {
  const link = name === 'default_1gbit' ? createLink('1gbit') : undefined;
  const at: ReceiverPlace | undefined = link ? { prefix: ['ip', 'netns', 'exec', link.ns], host: link.far, observer: link.near } : undefined;
  const guest = guestSpecOf({
    size,
    content: name === 'idle_random' ? 'random' : 'mixed',
    rate: name === 'idle_random' ? 0 : 64,
    pattern: 'uniform',
    hotSize: 64 << 20,
  });
  const got: Record<'plain' | 'encrypted', Sample[]> = { plain: [], encrypted: [] };
  try {
    for (let i = 0; i < runs; i++) {
      for (const mode of (i % 2 === 0 ? ['plain', 'encrypted'] : ['encrypted', 'plain']) as ('plain' | 'encrypted')[]) {
        const r = sample(await runDemo({ guest, secure: mode === 'encrypted', ...(at ? { receiverAt: at } : {}) }));
        if (r.encrypted !== (mode === 'encrypted')) throw new Error(`a ${mode} run reported encrypted: ${r.encrypted}`);
        got[mode].push(r);
        emit({ bench: 'secure', case: `${name}_run`, mode, run: i, ...r });
      }
    }
  } finally {
    link?.remove();
  }
  const of = (mode: 'plain' | 'encrypted', k: keyof Sample) => range(got[mode].map((s) => s[k] as number));
  const ratio = (k: keyof Sample) => +(median(got.encrypted.map((s) => s[k] as number)) / median(got.plain.map((s) => s[k] as number))).toFixed(3);
  const summary: Record<string, unknown> = {};
  for (const mode of ['plain', 'encrypted'] as const) {
    summary[mode] = {
      first_pass_ms: of(mode, 'first_pass_ms'),
      first_pass_mb_s: of(mode, 'first_pass_mb_s'),
      total_ms: of(mode, 'total_ms'),
      downtime_ms: of(mode, 'downtime_ms'),
      stop_pages: of(mode, 'stop_pages'),
      cpu_source_s: of(mode, 'cpu_source_s'),
      cpu_destination_s: of(mode, 'cpu_destination_s'),
    };
  }
  emit({
    bench: 'secure',
    case: name,
    ...summary,
    encrypted_over_plain: {
      first_pass_throughput: ratio('first_pass_mb_s'),
      total: ratio('total_ms'),
      downtime: ratio('downtime_ms'),
      cpu_source: ratio('cpu_source_s'),
      cpu_destination: ratio('cpu_destination_s'),
    },
    verified: [...got.plain, ...got.encrypted].every((s) => s.verified),
    runs,
  });
}
