/**
 * Outgoing migrations: a registered guest moved to another daemon. Each runs as its own
 * migrate() with its own connections; at most `maxConcurrent` run at once and the others
 * queue in order. Before the point of commitment any failure (and a cancel) resumes the guest
 * here and it stays registered; after it the guest runs at the destination.
 */
import { channelsFor } from './threadpool.js';
import { LivemigError } from '../errors.js';
import { migrate } from '../source/migrate.js';
import { MigrationControl, type MigrateOptions, type ProgressEvent } from '../source/types.js';
import type { Credentials } from '../security/tls.js';
import type { StallAction } from '../precopy/policy.js';
import { trace } from '../trace.js';
import type { KeptImages } from './images.js';
import { DaemonEvent } from '../trace-events.js';
import type { BandwidthShare } from './bandwidth.js';
import type { EventBus } from './events.js';
import type { DaemonMetrics } from './metrics.js';
import { sampleFromStatus } from './progress.js';
import { Migration, MigrationTable, PROGRESS_INTERVAL_MS } from './migration.js';
import type { MovingGuest } from './moving-guest.js';
import type { ClaimedGuest, GuestRegistry } from './registry.js';

export interface MigrationRequest {
  guest: string;
  to: { host: string; port: number; peer_name?: string };
  mode?: 'precopy' | 'postcopy' | 'hybrid';
  downtime_limit_ms?: number;
  bandwidth_mib_s?: number;
  postcopy_bandwidth_mib_s?: number;
  deadline_s?: number;
  on_stall?: StallAction;
  encodings?: boolean;
}

export interface OutgoingDeps {
  registry: GuestRegistry;
  table: MigrationTable;
  bus: EventBus;
  share: BandwidthShare;
  metrics: DaemonMetrics;
  maxConcurrent: number;
  /** the credentials migrations authenticate with (certificates: the peer's name is checked) */
  credentials: ((peerName: string | undefined) => Credentials | undefined) | undefined;
  insecure: boolean;
  /** where a released guest's memory is kept for its return (none: not kept) */
  images?: KeptImages;
}

export class OutgoingMigrations {
  readonly #d: OutgoingDeps;
  readonly #queue: { m: Migration; start: () => void }[] = [];
  #running = 0;

  constructor(deps: OutgoingDeps) {
    this.#d = deps;
  }

  /** Registers the migration (its guest is claimed now: two of one guest are refused) and starts or queues it. */
  start(req: MigrationRequest): Migration {
    const d = this.#d;
    const info = d.registry.info(req.guest);
    if (!info) throw new LivemigError('ERR_LIVEMIG_NOT_FOUND', `no guest named ${JSON.stringify(req.guest)} is registered here`, { phase: 'validate' });
    const credentials = d.credentials?.(req.to.peer_name);
    const control = new MigrationControl();
    const m = new Migration({
      direction: 'outgoing',
      guest: req.guest,
      peer: `${req.to.host}:${req.to.port}`,
      totalBytes: info.bytes,
      control,
      bus: d.bus,
      settings: {
        mode: req.mode ?? 'precopy',
        downtime_limit_ms: req.downtime_limit_ms,
        bandwidth_mib_s: req.bandwidth_mib_s,
        postcopy_bandwidth_mib_s: req.postcopy_bandwidth_mib_s,
        deadline_s: req.deadline_s,
        on_stall: req.on_stall,
        encodings: req.encodings !== false,
      },
    });
    const claimed = d.registry.claim(req.guest, m.id);
    m.sourceGuest = 'running';
    d.table.add(m);
    const run = (): void => {
      this.#running++;
      void this.#run(m, claimed, req, credentials).finally(() => {
        this.#running--;
        this.#next();
      });
    };
    if (this.#running < d.maxConcurrent) run();
    else {
      m.onCancelQueued = () => {
        const i = this.#queue.findIndex((q) => q.m === m);
        if (i >= 0) this.#queue.splice(i, 1);
        d.registry.settle(m.guest, 'kept');
        m.fail(new LivemigError('ERR_LIVEMIG_CANCELLED', 'migration cancelled while queued; the guest keeps running on the source', { phase: 'queued' }));
        d.metrics.finished(m);
      };
      this.#queue.push({ m, start: run });
      m.setState('queued');
    }
    return m;
  }

  #next(): void {
    const q = this.#queue.shift();
    if (q) {
      q.m.onCancelQueued = undefined;
      q.start();
    }
  }

  /** Queued migrations that have not started. */
  get queued(): Migration[] {
    return this.#queue.map((q) => q.m);
  }

  async #run(m: Migration, claimed: ClaimedGuest, req: MigrationRequest, credentials: Credentials | undefined): Promise<void> {
    const d = this.#d;
    const control = m.control!;
    // the settings as they are now: a PATCH while it was queued changed them
    if (m.settings.downtime_limit_ms !== undefined) control.setDowntimeLimit(m.settings.downtime_limit_ms);
    control.setPostcopyBandwidth(m.settings.postcopy_bandwidth_mib_s);
    d.share.join(m.id, control, m.settings.bandwidth_mib_s);
    m.setStage('connecting');
    m.setState('running');
    // between progress events (a first pass over gigabytes is one round), read where it is
    const poll = setInterval(() => this.#sample(m), PROGRESS_INTERVAL_MS);
    let guest: MovingGuest | undefined;
    try {
      guest = await claimed.open();
      // a QEMU's disks move by pre-copy only so far (docs/QEMU.md); its RAM by either
      const disks = claimed.kind === 'qemu' ? (guest.memory.disks ?? []) : [];
      if (disks.length > 0 && (req.mode ?? 'precopy') !== 'precopy')
        throw new LivemigError(
          'ERR_LIVEMIG_UNSUPPORTED',
          `mode ${req.mode}: the VM has disks (${disks.map((k) => k.name).join(', ')}), which move into QEMU by pre-copy only so far`,
          {
            phase: 'validate',
          },
        );
      const report = await migrate(this.#options(m, guest, req, credentials));
      m.complete(report);
      d.registry.settle(m.guest, 'released');
    } catch (e) {
      const code = (e as LivemigError).code;
      // what livemig took of the guest for this migration goes; the guest runs on here (or, its
      // outcome unknown, stays paused: only `livemig resolve` may say where it runs)
      if (m.sourceGuest !== 'released')
        await guest?.letGo().catch((err: unknown) => trace('daemon', DaemonEvent.guestNotLetGo, { id: m.id, reason: (err as Error).message }));
      d.registry.settle(m.guest, m.sourceGuest === 'released' ? 'released' : code === 'ERR_LIVEMIG_ACTIVATION_UNKNOWN' ? 'detached' : 'kept');
      m.fail(e);
      trace('daemon', DaemonEvent.migrationFailed, { id: m.id, code, reason: (e as Error).message });
    } finally {
      clearInterval(poll);
      d.share.leave(m.id);
      d.metrics.finished(m);
    }
  }

  /** migrate()'s options for moving `guest` as `req` asks. */
  #options(m: Migration, guest: MovingGuest, req: MigrationRequest, credentials: Credentials | undefined): MigrateOptions {
    const d = this.#d;
    const control = m.control!;
    return {
      ...guest.memory,
      to: { host: req.to.host, port: req.to.port },
      pause: async (lease) => {
        m.sourceGuest = 'paused';
        return guest.pause(lease);
      },
      commit: () => guest.commit(),
      resume: async () => {
        await guest.resume();
        m.sourceGuest = 'running';
      },
      release: async () => {
        // its memory, kept for its return, before the release lets the guest free it
        if (d.images?.keep(m.guest, guest.pieces, guest.memory.region.size))
          trace('daemon', DaemonEvent.imageKept, { guest: m.guest, bytes: guest.memory.region.size, held_bytes: d.images.bytes });
        await guest.release();
        m.sourceGuest = 'released';
      },
      ...(guest.throttle ? { throttle: (p: number) => guest.throttle!(p) } : {}),
      control,
      // the cores are shared by the migrations that may run at once: channels for this one's share
      channels: channelsFor(d.maxConcurrent),
      mode: req.mode ?? 'precopy',
      guestName: m.guest,
      ...(m.settings.downtime_limit_ms !== undefined ? { downtimeLimitMs: m.settings.downtime_limit_ms } : {}),
      ...(req.deadline_s !== undefined ? { deadlineMs: req.deadline_s * 1000 } : {}),
      ...(req.on_stall !== undefined ? { onStall: req.on_stall } : {}),
      ...(req.encodings === false ? { encodings: { zero: false, dedup: false, compress: false } } : {}),
      ...(credentials ? { credentials } : {}),
      ...(d.insecure ? { insecure: true } : {}),
      onProgress: (e) => this.#onProgress(m, e),
    };
  }

  #onProgress(m: Migration, e: ProgressEvent): void {
    switch (e.type) {
      case 'handshake':
        m.setStage('precopy');
        m.passedHandshake();
        break;
      case 'round':
        m.addRound(e);
        // the policy's own estimate of the pause, from the round that just ended
        this.#sample(m, { now: true, expectedDowntimeMs: e.expected_downtime_ms });
        if (e.decision === 'stop') m.setStage('stop-and-copy');
        if (e.decision === 'postcopy') m.setStage('postcopy');
        break;
      case 'stop-and-copy':
        // told after the commitment (its page count): a stage only moves forward (STAGES)
        m.setStage('stop-and-copy');
        break;
      case 'committed':
        m.setStage('activating');
        break;
      case 'activated':
        // in post-copy the guest is activated as post-copy begins: the stage stays postcopy
        m.setStage('activated');
        break;
      case 'postcopy': {
        m.setStage('postcopy');
        // the last pages out is a step the watcher must see (the poll may come after the end)
        const left = m.control?.status()?.postcopy?.pages_left;
        this.#sample(m, { now: left === 0 });
        break;
      }
    }
  }

  /** Progress from where the migration is now (its control's status), when it runs. */
  #sample(m: Migration, o: { now?: boolean; expectedDowntimeMs?: number } = {}): void {
    const s = m.control?.status();
    if (!s) return;
    const sample = sampleFromStatus(s, performance.now());
    if (o.expectedDowntimeMs !== undefined) sample.expectedDowntimeMs = o.expectedDowntimeMs;
    m.noteProgress(sample, { now: o.now ?? false });
  }
}
