/**
 * `livemig serve`: the daemon on each host. It lists the guests that register with it, moves
 * them to other daemons (outgoing), takes migrations from them (incoming), several at once in
 * both directions, and is driven over HTTP (api/). Shutdown refuses new migrations, lets the
 * running ones end (or cancels those before their commitment, their guests resumed here), and
 * only then stops.
 */
import { chmodSync, existsSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { LivemigError } from '../errors.js';
import type { Refusal } from '../refusals.js';
import type { Credentials } from '../security/tls.js';
import { assertSecureEnough } from '../security/tls.js';
import { setProcessNice } from '../sched.js';
import { trace } from '../trace.js';
import { DaemonEvent } from '../trace-events.js';
import { buildApi, type ApiTls } from './api/server.js';
import { apiTls, describeApi, type ApiAddress } from './api/transport.js';
import type { DaemonApi } from './api/types.js';
import { BandwidthShare } from './bandwidth.js';
import { MemoryBudget } from './budget.js';
import { EventBus } from './events.js';
import { KeptImages } from './images.js';
import { MigrationHistory, type HistoryConfig } from './history.js';
import { IncomingMigrations } from './incoming.js';
import { DaemonMetrics } from './metrics.js';
import { MigrationTable, type Migration } from './migration.js';
import { OutgoingMigrations, type MigrationRequest } from './outgoing.js';
import { GuestRegistry, removeStaleSocket } from './registry.js';
import { migrationsCarried } from './threadpool.js';

export type { ApiAddress } from './api/transport.js';

export interface DaemonConfig {
  /**
   * the HTTP API: a unix socket (mode 0600, plain HTTP), or TCP: HTTPS with the certificate of
   * `credentials`, and a token required (api/transport.ts)
   */
  api: ApiAddress;
  /** the API's bearer token (required on TCP; optional on the unix socket) */
  token?: string;
  /** the API on TCP in plain HTTP, on purpose: refused off loopback */
  insecureApi?: boolean;
  /** the API on TCP requires a client certificate signed by the CA of `credentials` (mutual TLS) */
  apiClientCerts?: boolean;
  /** the migration port */
  listen: { host: string; port: number };
  /** the socket guests register at */
  guests: string;
  /** one set of credentials for both directions (certificates: `allow` names the sources admitted) */
  credentials?: Credentials;
  insecure?: boolean;
  /** bytes incoming migrations may reserve together (default: what the host can hold at each admission) */
  memoryBudget?: number;
  /** total bandwidth of outgoing migrations, MiB/s, shared fairly (default none) */
  bandwidthMiBps?: number;
  /** incoming migrations at once (default 16); more are refused (busy) */
  maxMigrations?: number;
  /**
   * outgoing migrations that transfer at once (default: one per two CPUs); the others wait,
   * queued, in order. Measured on 2 vCPUs with 15 guests of 256 MiB (bench/RESULTS.md): one at
   * a time finished the batch sooner, and each migration faster and with a shorter pause,
   * than two or four at once (the guests and both sides share the same cores)
   */
  parallel?: number;
  /** the destination guest's command, a word of which holds {socket} (and {register} and {name}: where and as what it registers once it runs) */
  guestCommand: readonly string[];
  /**
   * every incoming guest is a QEMU VM started from this command (`serve --qemu-exec`: the
   * operator's, never an API caller's), a word of which holds {memory}; instead of guestCommand
   */
  qemuCommand?: readonly string[];
  /** where migrated-in guests' output goes, one file each (default: guest-logs beside the guest socket) */
  guestLogDir?: string;
  /**
   * the daemon's own nice value, set at start (default 0). The guests' pauses wait on the
   * daemon and its rounds race their writes: on 2 vCPUs with 15 guests, -5 brought the
   * downtime p99 from 21-59 ms to 16 ms (bench/RESULTS.md). The destination guests it starts
   * run at the nice it was started with, not at this one.
   */
  nice?: number;
  /** at shutdown, how long running migrations have to finish before those not yet committed are cancelled (default 30 s) */
  shutdownGraceMs?: number;
  /** how long POST /v1/migrations waits for the handshake (default 60 s) */
  handshakeWaitMs?: number;
  /** migration timeouts at this destination */
  authTimeoutMs?: number;
  idleTimeoutMs?: number;
  recoverTimeoutMs?: number;
  /** touch the memory of each guest coming in before its first page (ReceiveOptions.prealloc) */
  prealloc?: boolean;
  /** where guests' disks coming in are created, a directory per guest (ReceiveOptions.disks) */
  diskDir?: string;
  /** a failed migration's disk images are kept this long for the guest's next try */
  keepDisksMs?: number;
  /** bytes of released guests' memory kept for their return (0 or absent: none kept; images.ts) */
  keepImagesBytes?: number;
  version?: string;
  /** every source refused on the migration port, once recorded (`livemig serve` prints it) */
  onRefused?(r: Refusal): void;
  /**
   * the migration history on disk (src/daemon/history.ts): what earlier runs kept is listed
   * again, and every migration is written as it goes; without it, the daemon's migrations
   * live as long as the daemon (its bounds still apply)
   */
  history?: HistoryConfig;
}

/** The directory migrated-in guests' logs go to, made (mode 0700) if need be. */
function guestLogDir(config: DaemonConfig): string {
  const dir = config.guestLogDir ?? path.join(path.dirname(config.guests), 'guest-logs');
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw new LivemigError('ERR_LIVEMIG_SYSCALL', `cannot make the guest log directory ${dir}: ${(e as Error).message}`, { phase: 'listen', cause: e });
  }
  return dir;
}

export class Daemon implements DaemonApi {
  readonly startedAt = new Date();
  readonly bus: EventBus;
  readonly table: MigrationTable;
  history: MigrationHistory | undefined;
  /** released guests' memory kept for their return (--keep-images) */
  images: KeptImages | undefined;
  readonly metrics: DaemonMetrics;
  readonly budget: MemoryBudget;
  readonly share: BandwidthShare;
  readonly handshakeWaitMs: number;
  readonly config: DaemonConfig;
  registry!: GuestRegistry;
  outgoing!: OutgoingMigrations;
  incoming!: IncomingMigrations;
  api!: FastifyInstance;
  #shuttingDown = false;
  #closed: Promise<void> | undefined;
  /** where the API listens, as a client names it (unix:PATH, https://HOST:PORT, or http://HOST:PORT with insecureApi) */
  apiAddress = '';

  /**
   * Migrations at once, each direction: as asked, but no more than libuv's thread pool carries
   * (each holds pool threads in its blocking reads; `livemig serve` sizes the pool for its
   * --max-migrations, an embedding process sets UV_THREADPOOL_SIZE itself)
   */
  readonly maxMigrations: number;
  readonly parallel: number;

  private constructor(config: DaemonConfig) {
    this.config = config;
    this.bus = new EventBus({ perMigration: config.history?.keepEvents });
    this.table = new MigrationTable(this.bus, { finishedKept: config.history?.keepMigrations, onForget: (id) => this.history?.forget(id) });
    this.maxMigrations = Math.min(config.maxMigrations ?? 16, migrationsCarried());
    this.parallel = Math.min(config.parallel ?? defaultParallel(), this.maxMigrations);
    if (this.maxMigrations < (config.maxMigrations ?? 16)) {
      trace('daemon', DaemonEvent.fewerMigrations, { asked: config.maxMigrations ?? 16, allowed: this.maxMigrations });
    }
    this.budget = new MemoryBudget(config.memoryBudget);
    this.share = new BandwidthShare(config.bandwidthMiBps);
    this.handshakeWaitMs = config.handshakeWaitMs ?? 60_000;
    this.metrics = new DaemonMetrics({
      active: (dir) => this.table.active(dir).length,
      byState: () => {
        const n = new Map<string, number>();
        for (const m of this.table.list()) n.set(m.state, (n.get(m.state) ?? 0) + 1);
        return n;
      },
      reserved: () => this.budget.reserved,
      guests: () => this.registry?.size ?? 0,
      running: () => this.table.active().filter((m) => m.state === 'running'),
    });
  }

  static async start(config: DaemonConfig): Promise<Daemon> {
    if ('host' in config.api && config.token === undefined) {
      throw new LivemigError(
        'ERR_LIVEMIG_INSECURE',
        `the API on TCP (${config.api.host}:${config.api.port}) needs a bearer token (--token-file): whoever reaches it could move, read or activate guests`,
        { phase: 'validate' },
      );
    }
    if (config.token !== undefined && config.token.length < 16)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'the API token must be at least 16 characters', { phase: 'validate' });
    const tls = apiTls(config.api, {
      credentials: config.credentials,
      insecureApi: config.insecureApi === true,
      requireClientCert: config.apiClientCerts === true,
    });
    // the migration port's own rule: off loopback only with credentials (or --insecure)
    assertSecureEnough(config.listen.host, config.credentials, config.insecure === true, 'listening on');
    const d = new Daemon(config);
    const max = d.maxMigrations;
    const niceBefore = os.getPriority(0);
    if (config.nice !== undefined && config.nice !== niceBefore) setProcessNice(config.nice);
    // `nice -n` is relative: the destination guests go back to the nice this process had
    const nice = config.nice !== undefined && config.nice !== niceBefore ? ['nice', '-n', String(niceBefore - config.nice)] : [];
    const guestCommand = [...nice, ...config.guestCommand];
    // a destination QEMU in a session of its own (setsid execs it: the pid is QEMU's), as the other guests: no signal to the daemon's group reaches it
    const qemuCommand = config.qemuCommand ? [...ownSession(), ...nice, ...config.qemuCommand] : undefined;
    try {
      if (config.history) {
        d.history = MigrationHistory.open(config.history);
        d.history.attach(d.table, d.bus);
      }
      d.registry = await GuestRegistry.open(config.guests);
      const images = config.keepImagesBytes ? (d.images = new KeptImages(config.keepImagesBytes)) : undefined;
      d.outgoing = new OutgoingMigrations({
        ...(images ? { images } : {}),
        registry: d.registry,
        table: d.table,
        bus: d.bus,
        share: d.share,
        metrics: d.metrics,
        maxConcurrent: d.parallel,
        credentials: config.credentials ? (peer) => outgoingCredentials(config.credentials!, peer) : undefined,
        insecure: config.insecure === true,
      });
      d.incoming = await IncomingMigrations.listen(config.listen.host, config.listen.port, {
        table: d.table,
        bus: d.bus,
        budget: d.budget,
        metrics: d.metrics,
        maxConcurrent: max,
        guestCommand,
        ...(qemuCommand ? { qemuCommand } : {}),
        guests: { socket: d.registry.path, listed: (name) => d.registry.listed(name) },
        guestLogDir: guestLogDir(config),
        credentials: config.credentials,
        insecure: config.insecure === true,
        ...(config.authTimeoutMs !== undefined ? { authTimeoutMs: config.authTimeoutMs } : {}),
        ...(config.idleTimeoutMs !== undefined ? { idleTimeoutMs: config.idleTimeoutMs } : {}),
        ...(config.recoverTimeoutMs !== undefined ? { recoverTimeoutMs: config.recoverTimeoutMs } : {}),
        ...(config.onRefused ? { onRefused: config.onRefused } : {}),
        ...(config.prealloc ? { prealloc: true } : {}),
        ...(config.diskDir ? { diskDir: config.diskDir } : {}),
        ...(config.keepDisksMs ? { keepDisksMs: config.keepDisksMs } : {}),
        ...(images ? { images } : {}),
      });
      d.api = await buildApi(d, { token: config.token, version: config.version ?? '0', tls });
      await d.#listenApi(tls);
    } catch (e) {
      await d.#closeParts();
      throw e;
    }
    trace('daemon', DaemonEvent.serving, { api: d.apiAddress, port: d.incoming.receiver.port, guests: config.guests });
    return d;
  }

  async #listenApi(tls: ApiTls | undefined): Promise<void> {
    const a = this.config.api;
    if ('path' in a) {
      mkdirSync(path.dirname(a.path), { recursive: true, mode: 0o700 });
      removeStaleSocket(a.path);
      await this.api.listen({ path: a.path });
      chmodSync(a.path, 0o600); // only root and this user reach the API on the socket
      this.apiAddress = describeApi(a, tls, 0);
    } else {
      await this.api.listen({ host: a.host, port: a.port });
      const addr = this.api.server.address();
      this.apiAddress = describeApi(a, tls, typeof addr === 'object' && addr ? addr.port : a.port);
    }
  }

  get shuttingDown(): boolean {
    return this.#shuttingDown;
  }

  /** the migration port as bound (port 0 resolved) */
  get migrationPort(): number {
    return this.incoming.receiver.port;
  }

  describe(): Record<string, unknown> {
    return {
      ok: !this.#shuttingDown,
      state: this.#shuttingDown ? 'shutting-down' : 'serving',
      version: this.config.version ?? '0',
      uptime_s: +((Date.now() - this.startedAt.getTime()) / 1e3).toFixed(1),
      migration_port: this.migrationPort,
      guests: this.registry.size,
      migrations: { outgoing: this.table.active('outgoing').length, incoming: this.table.active('incoming').length },
      memory_budget: { limit_bytes: this.budget.limit ?? null, reserved_bytes: this.budget.reserved, peak_bytes: this.budget.peak },
      bandwidth_mib_s: this.share.total ?? null,
      max_migrations: this.maxMigrations,
      parallel: this.parallel,
      history: this.history?.describe() ?? null,
    };
  }

  startMigration(req: MigrationRequest): Migration {
    if (this.#shuttingDown) throw new LivemigError('ERR_LIVEMIG_SHUTTING_DOWN', 'the daemon is shutting down: it takes no new migration', { phase: 'api' });
    if (this.config.credentials?.kind === 'cert' && !req.to.peer_name) {
      throw new LivemigError(
        'ERR_LIVEMIG_INVALID_ARGUMENT',
        "to.peer_name is required: this daemon authenticates with certificates, and the destination's name must be checked",
        { phase: 'validate' },
      );
    }
    assertSecureEnough(req.to.host, this.config.credentials, this.config.insecure === true, 'migrating to');
    return this.outgoing.start(req);
  }

  #outgoing(id: string): Migration {
    const m = this.table.get(id);
    if (m.direction !== 'outgoing')
      throw new LivemigError('ERR_LIVEMIG_STATE', `migration ${id} is incoming: it is controlled from its source's daemon`, { phase: 'api' });
    if (m.done) throw new LivemigError('ERR_LIVEMIG_STATE', `migration ${id} is ${m.state} already`, { phase: 'api' });
    return m;
  }

  cancel(id: string): Migration {
    const m = this.#outgoing(id);
    if (m.state === 'queued') m.onCancelQueued?.();
    else m.control!.cancel(); // ERR_LIVEMIG_STATE past the point of commitment
    return m;
  }

  startPostcopy(id: string): Migration {
    const m = this.#outgoing(id);
    m.control!.startPostcopy();
    return m;
  }

  update(id: string, change: { bandwidth_mib_s?: number; postcopy_bandwidth_mib_s?: number; downtime_limit_ms?: number }): Migration {
    const m = this.#outgoing(id);
    if (change.downtime_limit_ms !== undefined) {
      m.control!.setDowntimeLimit(change.downtime_limit_ms);
      m.settings.downtime_limit_ms = change.downtime_limit_ms;
    }
    if (change.bandwidth_mib_s !== undefined) {
      m.settings.bandwidth_mib_s = change.bandwidth_mib_s;
      if (m.state === 'running') this.share.want(m.id, change.bandwidth_mib_s);
    }
    if (change.postcopy_bandwidth_mib_s !== undefined) {
      m.settings.postcopy_bandwidth_mib_s = change.postcopy_bandwidth_mib_s;
      m.control!.setPostcopyBandwidth(change.postcopy_bandwidth_mib_s);
    }
    return m;
  }

  extra(m: Migration): Record<string, unknown> {
    const pid = m.direction === 'incoming' ? this.incoming.guestPid(m.id) : undefined;
    return pid ? { guest_pid: pid } : {};
  }

  /**
   * Stops taking migrations, waits for the running ones (up to the grace period), then cancels
   * the outgoing ones not yet committed (their guests resume here) and aborts the incoming ones
   * whose sources have not paused yet (their guests never stopped), waits for the rest (inside
   * their pause, committed, in post-copy: they must finish), and closes.
   */
  shutdown(): Promise<void> {
    this.#closed ??= this.#shutdown();
    return this.#closed;
  }

  async #shutdown(): Promise<void> {
    this.#shuttingDown = true;
    this.incoming.receiver.refuseMigrations();
    trace('daemon', DaemonEvent.shuttingDown, { running: this.table.active().length });
    for (const m of this.outgoing.queued) m.onCancelQueued?.();
    const grace = this.config.shutdownGraceMs ?? 30_000;
    const until = Date.now() + grace;
    while (this.table.active().length > 0 && Date.now() < until) await sleep(50);
    for (const m of this.table.active('outgoing')) {
      try {
        m.control!.cancel();
      } catch (e) {
        // past its commitment: it must finish (its guest may already run at the destination)
        trace('daemon', DaemonEvent.shutdownWaits, { id: m.id, reason: (e as Error).message });
      }
    }
    // incoming ones whose sources have not paused: their sources resume nothing, and retry elsewhere
    const aborted = this.incoming.receiver.abortUnpaused(
      new LivemigError('ERR_LIVEMIG_SHUTTING_DOWN', 'the destination daemon is shutting down; the guest keeps running at its source', { phase: 'receiving' }),
    );
    if (aborted > 0) trace('daemon', DaemonEvent.shutdownAborted, { aborted });
    // what remains is inside its pause, committed or in post-copy: it must finish
    while (this.table.active().length > 0) await sleep(50);
    await this.#closeParts();
  }

  async #closeParts(): Promise<void> {
    await this.api?.close().catch((e: unknown) => trace('daemon', DaemonEvent.apiCloseFailed, { reason: (e as Error).message }));
    if ('path' in this.config.api && this.api) removeStaleSocket(this.config.api.path);
    await this.incoming?.close();
    await this.registry?.close();
    // last: the migrations' final events are written by now
    this.history?.close();
    this.images?.close();
  }
}

function outgoingCredentials(c: Credentials, peerName: string | undefined): Credentials {
  if (c.kind === 'psk') return c;
  const { allow: _allow, ...own } = c;
  return { ...own, ...(peerName !== undefined ? { peerName } : {}) };
}

/** setsid(1), where it is on the PATH (util-linux): a child that leads no group, it execs in place */
function ownSession(): string[] {
  for (const dir of (process.env['PATH'] ?? '/usr/bin:/bin').split(':')) {
    const p = path.join(dir, 'setsid');
    if (existsSync(p)) return [p];
  }
  return [];
}

/** one outgoing transfer per two CPUs: a migration's sender and the guests it moves share them */
export function defaultParallel(): number {
  return Math.max(1, Math.floor(os.availableParallelism() / 2));
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
