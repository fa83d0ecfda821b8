/**
 * The daemon's Prometheus metrics (prom-client, on a registry of its own). Counters move when a
 * migration ends, from its final report, so that they match the reports exactly; the
 * per-migration gauges read each running migration's latest progress when scraped, and a
 * migration's series go when it ends (their labels are bounded by the migrations running).
 */
import { PAGE_SIZE } from '../protocol/format.js';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { MigrationReport } from '../source/types.js';
import type { ReceiveReport } from '../receiver/types.js';
import { REFUSAL_REASONS, type RefusalReason } from '../refusals.js';
import type { Migration } from './migration.js';
import type { ProgressView } from './progress.js';

const ENCODINGS = ['zero', 'dup', 'lz4', 'raw', 'skipped'] as const;

/** What the gauges read when scraped: the daemon's state now. */
interface LiveSources {
  active: (direction: 'outgoing' | 'incoming') => number;
  byState: () => Map<string, number>;
  reserved: () => number;
  guests: () => number;
  /** the migrations running now (queued ones have no progress yet) */
  running: () => Migration[];
}

type MigrationLabel = 'migration' | 'guest' | 'direction';

/** One gauge per progress figure, a series per running migration (none for a figure it does not know). */
const MIGRATION_GAUGES: { name: string; help: string; value: (v: ProgressView) => number | undefined }[] = [
  { name: 'livemig_migration_progress_percent', help: 'progress of a running migration, percent (never backwards)', value: (v) => v.percent },
  {
    name: 'livemig_migration_remaining_bytes',
    help: 'region bytes a running migration has still to send now (pre-copy: this round and the held pages; post-copy: pages not yet at the destination)',
    value: (v) => v.remaining_bytes,
  },
  { name: 'livemig_migration_transferred_bytes', help: 'region bytes a running migration sent so far, resends included', value: (v) => v.transferred_bytes },
  { name: 'livemig_migration_wire_bytes', help: 'bytes a running migration put on the wire so far, frames included', value: (v) => v.wire_bytes },
  {
    name: 'livemig_migration_throughput_bytes_per_second',
    help: 'region bytes per second a running migration moves, over the last second',
    value: (v) => v.throughput_bytes_per_s,
  },
  {
    name: 'livemig_migration_dirty_rate_bytes_per_second',
    help: 'region bytes per second the guest of a migration in pre-copy writes',
    value: (v) => v.dirty_bytes_per_s,
  },
  {
    name: 'livemig_migration_expected_downtime_seconds',
    help: 'the pause a migration in pre-copy expects if it stopped now',
    value: (v) => (v.expected_downtime_ms === undefined ? undefined : v.expected_downtime_ms / 1e3),
  },
  {
    name: 'livemig_migration_postcopy_pages_left',
    help: 'pages a migration in post-copy has not yet at the destination',
    value: (v) => v.postcopy?.pages_left,
  },
];

/** The per-migration gauges: set from the running migrations at each scrape, so an ended one has no series. */
function migrationGauges(running: () => Migration[], registers: Registry[]): void {
  for (const g of MIGRATION_GAUGES) {
    new Gauge<MigrationLabel>({
      name: g.name,
      help: g.help,
      labelNames: ['migration', 'guest', 'direction'],
      registers,
      collect() {
        this.reset();
        for (const m of running()) {
          const v = g.value(m.progress.view);
          if (v !== undefined) this.set({ migration: m.id, guest: m.guest, direction: m.direction }, v);
        }
      },
    });
  }
}

/** The gauges, read from the daemon when /metrics is scraped (the counters move when a migration ends). */
function liveGauges(o: LiveSources, registers: Registry[]): void {
  new Gauge({
    name: 'livemig_migrations',
    help: 'migrations known to the daemon now, by state',
    labelNames: ['state'],
    registers,
    collect() {
      this.reset();
      for (const [state, n] of o.byState()) this.set({ state }, n);
    },
  });
  new Gauge({
    name: 'livemig_active_migrations',
    help: 'migrations queued or running now, by direction',
    labelNames: ['direction'],
    registers,
    collect() {
      this.set({ direction: 'outgoing' }, o.active('outgoing'));
      this.set({ direction: 'incoming' }, o.active('incoming'));
    },
  });
  new Gauge({
    name: 'livemig_memory_reserved_bytes',
    help: 'bytes reserved now by incoming migrations (the memory budget in use)',
    registers,
    collect() {
      this.set(o.reserved());
    },
  });
  new Gauge({
    name: 'livemig_registered_guests',
    help: 'guests registered with this daemon now',
    registers,
    collect() {
      this.set(o.guests());
    },
  });
}

export class DaemonMetrics {
  readonly registry = new Registry();
  readonly #migrations: Counter<'direction' | 'state'>;
  readonly #pages: Counter<'encoding'>;
  readonly #payload: Counter<'encoding'>;
  readonly #wire: Counter<'direction'>;
  readonly #downtime: Histogram;
  readonly #limitMissed: Counter;
  readonly #total: Histogram;
  readonly #faults: Histogram;
  readonly #api: Histogram<'route'>;
  readonly #refused: Counter<'reason'>;
  readonly #diskBlocks: Counter;
  readonly #diskBytes: Counter;

  constructor(o: LiveSources) {
    const registers = [this.registry];
    this.#migrations = new Counter({
      name: 'livemig_migrations_total',
      help: 'migrations that ended, by direction and final state',
      labelNames: ['direction', 'state'],
      registers,
    });
    liveGauges(o, registers);
    migrationGauges(o.running, registers);
    this.#pages = new Counter({
      name: 'livemig_pages_total',
      help: 'pages sent by completed outgoing migrations, by how they went (skipped: already at the destination)',
      labelNames: ['encoding'],
      registers,
    });
    this.#payload = new Counter({
      name: 'livemig_page_payload_bytes_total',
      help: 'page payload bytes sent by completed outgoing migrations, by encoding (zero and dup pages carry none)',
      labelNames: ['encoding'],
      registers,
    });
    this.#wire = new Counter({
      name: 'livemig_wire_bytes_total',
      help: 'bytes on the wire of completed migrations (outgoing: sent, frames included; incoming: pages received x page size)',
      labelNames: ['direction'],
      registers,
    });
    const ms = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1];
    this.#downtime = new Histogram({
      name: 'livemig_downtime_seconds',
      help: "from the guest's pause to its activation at the destination, as the source measured it, of completed outgoing migrations",
      buckets: ms,
      registers,
    });
    this.#total = new Histogram({
      name: 'livemig_total_time_seconds',
      help: 'from connecting to done, of completed outgoing migrations',
      buckets: [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300],
      registers,
    });
    this.#faults = new Histogram({
      name: 'livemig_postcopy_fault_latency_seconds',
      help: 'post-copy fault latency at this destination, fault read to page mapped',
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05],
      registers,
    });
    this.#api = new Histogram({
      name: 'livemig_api_request_duration_seconds',
      help: 'API request handling time, by route',
      labelNames: ['route'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5],
      registers,
    });
    this.#limitMissed = new Counter({
      name: 'livemig_downtime_limit_missed_total',
      help: 'completed outgoing migrations whose pause was longer than their downtime limit (the report says why)',
      registers,
    });
    this.#refused = new Counter({
      name: 'livemig_incoming_refused_total',
      help: 'sources refused at this destination, by reason (src/refusals.ts: peer-not-allowed, psk-mismatch, busy, memory, ...)',
      labelNames: ['reason'],
      registers,
    });
    // per disk would be a label of unbounded values (guests' own names): totals here, each disk in the report
    this.#diskBlocks = new Counter({
      name: 'livemig_disk_blocks_sent_total',
      help: "4 KiB blocks of guests' disks sent by completed outgoing migrations (a block sent twice counts twice)",
      registers,
    });
    this.#diskBytes = new Counter({
      name: 'livemig_disk_bytes_total',
      help: 'size of the disks completed outgoing migrations moved',
      registers,
    });
    // every reason from the start, at 0: a rate over a series that appears only at its first refusal misses that one
    for (const reason of REFUSAL_REASONS) this.#refused.inc({ reason }, 0);
  }

  finished(m: Migration): void {
    this.#migrations.inc({ direction: m.direction, state: m.state });
    if (m.state !== 'completed' || !m.report) return;
    if (m.direction === 'outgoing') {
      const r = m.report as MigrationReport;
      for (const e of ENCODINGS) this.#pages.inc({ encoding: e }, r[`${e}_pages`]);
      this.#payload.inc({ encoding: 'raw' }, r.raw_pages * PAGE_SIZE);
      this.#payload.inc({ encoding: 'lz4' }, Math.round(r.lz4_pages * PAGE_SIZE * r.lz4_ratio));
      this.#wire.inc({ direction: 'outgoing' }, r.wire_bytes);
      this.#downtime.observe(r.downtime_ms / 1e3);
      if (!r.downtime_limit_met) this.#limitMissed.inc();
      this.#total.observe(r.total_ms / 1e3);
      for (const d of r.disks ?? []) {
        this.#diskBlocks.inc(d.blocks_sent);
        this.#diskBytes.inc(d.bytes);
      }
    } else {
      const r = m.report as ReceiveReport;
      this.#wire.inc({ direction: 'incoming' }, r.pages_received * PAGE_SIZE);
    }
  }

  faultLatencies(ns: Float64Array): void {
    for (const v of ns) this.#faults.observe(v / 1e9);
  }

  refused(reason: RefusalReason): void {
    this.#refused.inc({ reason });
  }

  apiRequest(route: string, seconds: number): void {
    this.#api.observe({ route }, seconds);
  }
}
