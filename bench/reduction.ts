/**
 * bench/reduction: what the page encodings save, per content, idle and with 64 MiB/s uniform
 * writes, encodings on and off, on loopback and through a 1 Gbit/s link (a network namespace
 * joined by a veth pair shaped with htb, created and removed here). Also: migrating back to a
 * kept image after 10% of the pages changed. Baselines in the same run: the raw-TCP ceiling on
 * loopback and the line rate of the link.
 *   node dist/bench/reduction.js [--size 1GiB] [--runs 1] [--links loopback,1gbit] [--contents random,mixed,text,dup,zero] [--rates 0,64]
 */
import { randomBytes } from 'node:crypto';
import { rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { guestSpecOf, runDemo, type DemoReport, type ReceiverPlace } from '../src/demo/demo.js';
import { guestAddon } from '../src/workload/guest-addon.js';
import { migrate } from '../src/source/migrate.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { emit, machine, median } from './common.js';
import { createLink, type NetLink } from './netlink.js';
import { rawTcpCeiling } from './raw-tcp.js';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: String(1 << 30) },
    runs: { type: 'string', default: '1' },
    links: { type: 'string', default: 'loopback,1gbit' },
    contents: { type: 'string', default: 'random,mixed,text,dup,zero' },
    rates: { type: 'string', default: '0,64' },
  },
});
const size = Number(values.size);
const runs = Number(values.runs);
const ON = { zero: true, dedup: true, compress: true };
const OFF = { zero: false, dedup: false, compress: false };

emit({ bench: 'reduction', case: 'machine', ...machine(), region_bytes: size });

for (const linkName of values.links!.split(',')) {
  let link: NetLink | undefined;
  let at: ReceiverPlace = { prefix: [], host: '127.0.0.1' };
  if (linkName === 'loopback') {
    const ceiling = median([await rawTcpCeiling(size), await rawTcpCeiling(size), await rawTcpCeiling(size)]);
    emit({ bench: 'reduction', case: 'baseline', link: linkName, raw_tcp_ms: +ceiling.toFixed(1), mb_s: +(size / 1e3 / ceiling).toFixed(0) });
  } else {
    link = createLink(linkName);
    at = { prefix: ['ip', 'netns', 'exec', link.ns], host: link.far, observer: link.near };
    emit({ bench: 'reduction', case: 'baseline', link: linkName, line_rate_ms: +((size * 8) / 1e6).toFixed(0), note: 'payload at the htb rate, no framing' });
  }
  try {
    for (const content of values.contents!.split(',')) {
      for (const rate of values.rates!.split(',').map(Number)) {
        const results: Record<string, DemoReport[]> = { on: [], off: [] };
        for (let i = 0; i < runs; i++) {
          // alternate the order, so neither setting always runs after the other
          const order =
            i % 2 === 0
              ? ([
                  ['off', OFF],
                  ['on', ON],
                ] as const)
              : ([
                  ['on', ON],
                  ['off', OFF],
                ] as const);
          for (const [name, enc] of order) {
            const r = await runDemo({
              guest: guestSpecOf({ size, content, rate, pattern: 'uniform', hotSize: 64 << 20 }),
              downtimeLimitMs: 20,
              encodings: enc,
              receiverAt: at,
            });
            results[name]!.push(r);
            if (process.env.BENCH_VERBOSE) console.error(name, r.prep_ms, r.total_ms);
          }
        }
        for (const name of ['off', 'on'] as const) {
          const rs = results[name]!;
          emit({
            bench: 'reduction',
            case: 'migration',
            link: linkName,
            content,
            write_mib_s: rate,
            encodings: name,
            total_ms: median(rs.map((r) => r.total_ms)),
            downtime_ms: median(rs.map((r) => r.downtime_ms)),
            rounds: median(rs.map((r) => r.rounds)),
            wire_bytes: median(rs.map((r) => r.wire_bytes)),
            wire_over_region: +(median(rs.map((r) => r.wire_bytes)) / size).toFixed(3),
            zero_pages: median(rs.map((r) => r.zero_pages)),
            dup_pages: median(rs.map((r) => r.dup_pages)),
            lz4_pages: median(rs.map((r) => r.lz4_pages)),
            raw_pages: median(rs.map((r) => r.raw_pages)),
            skipped_pages: median(rs.map((r) => r.skipped_pages)),
            lz4_ratio: median(rs.map((r) => r.lz4_ratio)),
            verified: rs.every((r) => r.verified),
            runs: rs.length,
          });
        }
        const on = median(results.on!.map((r) => r.total_ms));
        const off = median(results.off!.map((r) => r.total_ms));
        emit({
          bench: 'reduction',
          case: 'on_vs_off',
          link: linkName,
          content,
          write_mib_s: rate,
          on_ms: on,
          off_ms: off,
          on_over_off: +(on / off).toFixed(3),
          speedup: +(off / on).toFixed(2),
        });
      }
    }
  } finally {
    link?.remove();
  }
}

// Migrating back: the destination kept the image the guest left with; 10% of pages changed since.
{
  const src = Region.create(size, { name: 'bench-back' });
  await guestAddon.contentFill(src.address, src.size, 4, 1n); // mixed
  const image = path.join(tmpdir(), `livemig-bench-image-${process.pid}`);
  await writeFile(image, src.view());
  const pages = src.pageCount;
  const changed = Math.floor(pages / 10);
  const picked = new Set<number>();
  while (picked.size < changed) picked.add(Math.floor(Math.random() * pages));
  for (const p of picked) src.page(p).set(randomBytes(src.pageSize));
  const rx = await listen('127.0.0.1', 0, { reuseImage: image, activate: async () => undefined });
  try {
    const rep = await migrate({ region: src, to: { host: '127.0.0.1', port: rx.port }, pause: async () => new Uint8Array(0), resume: async () => undefined });
    await rx.next();
    emit({
      bench: 'reduction',
      case: 'migrate_back_10pct',
      changed_pages: changed,
      wire_bytes: rep.wire_bytes,
      wire_over_region: +(rep.wire_bytes / size).toFixed(4),
      skipped_pages: rep.skipped_pages,
      total_ms: rep.total_ms,
      verified: rep.verified,
    });
  } finally {
    await rx.close();
    src.release();
    await rm(image, { force: true });
  }
}
