/**
 * Incoming migrations: the daemon's migration port, several sources at once. Each HELLO gets a
 * migration of its own (listed like an outgoing one), its own destination guest, and its bytes
 * from the shared memory budget before anything is reserved.
 */
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { PAGE_SIZE } from '../protocol/format.js';
import { channelsFor } from './threadpool.js';
import { IncomingGuest } from '../guest/incoming-session.js';
import type { IncomingQemu } from '../vmm/qemu/incoming.js';
import { startQemu } from '../cli/qemu-exec.js';
import { postcopyRefusal as qemuPostcopyRefusal } from '../vmm/qemu/postcopy.js';
import { listen, type Receiver } from '../receiver/listen.js';
import { isRefusedBeforeReserving } from '../receiver/failures.js';
import type { Refusal } from '../refusals.js';
import type { ReceiveOptions, ReceiveProgress, ReceiveReport } from '../receiver/types.js';
import type { Credentials } from '../security/tls.js';
import { trace } from '../trace.js';
import type { KeptImages } from './images.js';
import { DaemonEvent } from '../trace-events.js';
import type { MemoryBudget } from './budget.js';
import type { EventBus } from './events.js';
import type { DaemonMetrics } from './metrics.js';
import { Migration, type MigrationSettings, type MigrationTable } from './migration.js';
import type { ProgressSample } from './progress.js';

/** what an incoming migration shows as its settings: the source chose them */
const INCOMING_SETTINGS: MigrationSettings = {
  mode: 'precopy',
  downtime_limit_ms: undefined,
  bandwidth_mib_s: undefined,
  postcopy_bandwidth_mib_s: undefined,
  deadline_s: undefined,
  on_stall: undefined,
  encodings: true,
};

export interface IncomingDeps {
  table: MigrationTable;
  bus: EventBus;
  budget: MemoryBudget;
  metrics: DaemonMetrics;
  maxConcurrent: number;
  /** the destination guest's command, with {socket} (and {register} and {name}, to serve again here once it runs) */
  guestCommand: readonly string[];
  /**
   * every guest coming in is a QEMU VM started from this command (`serve --qemu-exec`, a word of
   * which holds {memory}) instead of guestCommand: pre-copy only, no disks (docs/QEMU.md)
   */
  qemuCommand?: readonly string[];
  /** the daemon's guest socket, where a migrated-in guest registers, and whether a name is listed there now */
  guests: { socket: string; listed(name: string): boolean };
  /** where each migrated-in guest's output goes: DIR/NAME-MIGRATION.log (guests outlive the daemon, and its pipes) */
  guestLogDir: string;
  credentials: Credentials | undefined;
  insecure: boolean;
  authTimeoutMs?: number;
  idleTimeoutMs?: number;
  recoverTimeoutMs?: number;
  /** touch the memory of each guest coming in before its first page (ReceiveOptions.prealloc) */
  prealloc?: boolean;
  /** where guests' disks coming in are created, a directory per guest */
  diskDir?: string;
  /** a failed migration's disk images are kept this long for the guest's next try */
  keepDisksMs?: number;
  /** images of guests this daemon sent away: one coming back starts from its own (none: from zeros) */
  images?: KeptImages;
  /** every source refused here, once recorded and counted (`livemig serve` prints a line) */
  onRefused?(r: Refusal): void;
}

export class IncomingMigrations {
  readonly receiver: Receiver;
  readonly #guestPids = new Map<string, number>();
  /** names of guests coming in, or arrived and not yet registered: their pid once they run */
  readonly #arriving = new Map<string, number | undefined>();
  /** migrations coming in now (each gets its share of the cores as channels) */
  #active = 0;

  private constructor(receiver: Receiver) {
    this.receiver = receiver;
  }

  static async listen(host: string, port: number, d: IncomingDeps): Promise<IncomingMigrations> {
    const base: ReceiveOptions = {
      ...(d.credentials ? { credentials: d.credentials } : {}),
      ...(d.insecure ? { insecure: true } : {}),
      ...(d.authTimeoutMs !== undefined ? { authTimeoutMs: d.authTimeoutMs } : {}),
      ...(d.idleTimeoutMs !== undefined ? { idleTimeoutMs: d.idleTimeoutMs } : {}),
      ...(d.recoverTimeoutMs !== undefined ? { recoverTimeoutMs: d.recoverTimeoutMs } : {}),
      ...(d.prealloc ? { prealloc: true } : {}),
      ...(d.diskDir ? { disks: { dir: d.diskDir, perGuest: true, ...(d.keepDisksMs ? { keepMs: d.keepDisksMs } : {}) } } : {}),
      activate: () => Promise.reject(new Error('internal: a migration without its own callbacks')),
    };
    const receiver = await listen(host, port, base, {
      maxConcurrent: d.maxConcurrent,
      perMigration: () => self.#one(d),
      onRefused: (r) => self.#refused(d, r, undefined),
    });
    const self = new IncomingMigrations(receiver);
    return self;
  }

  /** The destination guest's pid of a completed incoming migration. */
  guestPid(id: string): number | undefined {
    return this.#guestPids.get(id);
  }

  /**
   * A source refused here: recorded as an incoming migration in state `refused` (the one its
   * HELLO began, if it had got that far), counted by reason, and told to the operator.
   */
  #refused(d: IncomingDeps, r: Refusal, begun: Migration | undefined): void {
    let m = begun;
    if (!m || m.done) {
      m = new Migration({ direction: 'incoming', guest: '', peer: r.from, totalBytes: 0, bus: d.bus, settings: INCOMING_SETTINGS });
      d.table.add(m);
    }
    m.refuse(r);
    d.metrics.refused(r.reason);
    d.onRefused?.(r);
  }

  #one(d: IncomingDeps): { options: ReceiveOptions; settled(outcome: Promise<ReceiveReport>): void; refused(r: Refusal): void } {
    let m: Migration | undefined;
    let guest: IncomingGuest | undefined;
    /** the destination QEMU, when this daemon takes QEMU VMs (`serve --qemu-exec`) */
    let qemu: IncomingQemu | undefined;
    /** the name the source gave its guest, held here from HELLO on */
    let arriving: string | undefined;
    const received = { pages: 0 };
    const onProgress = (e: ReceiveProgress): void => {
      if (e.type === 'hello') m = recordArrival(d, e);
      else if (m) followArrival(m, e, received);
    };
    // the cores are shared by the migrations coming in at once: this one gets its share of readers
    this.#active++;
    /** the image this daemon kept of the guest when it left, loaded before any page comes (images.ts) */
    let image: ReturnType<KeptImages['take']>;
    const options: ReceiveOptions = {
      maxChannels: channelsFor(this.#active),
      imageFor: (name, bytes) => (image = d.images?.take(name, bytes))?.path,
      reserveMemory: (bytes, local, name) => {
        this.#claimName(d, name);
        arriving = name;
        return d.budget.take(bytes, { local });
      },
      onReserved: async (_region, postcopy, layout, memory) => {
        if (d.qemuCommand) {
          // its output must not reach the daemon's stdout (its JSON lines); its stderr is kept for QEMU's own words
          qemu = await startQemu(d.qemuCommand, layout, memory, { stdout: 'ignore' });
          return;
        }
        // a guest the source named serves again here under that name (one it did not: under the migration's id)
        const name = arriving ?? `incoming-${m!.id.slice(0, 8)}`;
        guest = await IncomingGuest.start({
          command: d.guestCommand,
          layout,
          files: memory.files,
          ...(memory.disks ? { disks: memory.disks } : {}),
          populate: postcopy !== 'planned' && !memory.local,
          registerEarly: postcopy === 'planned',
          registerAt: { socket: d.guests.socket, name },
          outlive: { unit: m!.id, log: path.join(d.guestLogDir, `${name}-${m!.id}.log`) },
        });
      },
      // post-copy into QEMU: the preload library registers QEMU's mapping (docs/QEMU.md), offered where it is built
      ...(d.qemuCommand
        ? qemuPostcopyRefusal() === undefined
          ? { postcopy: { register: async () => qemu!.register() } }
          : {}
        : { postcopy: { register: () => guest!.register(), giveDiskAsks: (fd: number) => guest!.giveDiskAsks(fd) } }),
      onProgress,
      onFaultLatencies: (ns) => d.metrics.faultLatencies(ns),
      onDiscard: () => (qemu?.kill(), guest?.kill()),
      prepare: (_region, state, o) => (qemu ? qemu.prepare(state, o) : guest!.prepare(state)),
      activate: async (_region, state) => {
        await (qemu ? qemu.activate(state) : guest!.activate(state));
      },
    };
    const pid = (): number | undefined => qemu?.pid ?? guest?.pid;
    return {
      options,
      refused: (r) => this.#refused(d, r, m),
      settled: (outcome) => {
        void outcome
          .finally(() => {
            this.#active--;
            image?.release();
          })
          .catch(() => undefined);
        outcome.then(
          (report) => {
            if (report.mode === 'postcopy') guest?.allPresent();
            const untracked = report.mode === 'postcopy' ? qemu?.allPresent() : undefined;
            if (untracked) process.stderr.write(`livemig: the VM's writes are not tracked for its next migration (it will be hashed): ${untracked}\n`);
            if (pid()) this.#guestPids.set(m!.id, pid()!);
            // held until it registers (or exits): a second guest of its name is refused meanwhile
            if (arriving !== undefined) this.#arriving.set(arriving, pid());
            guest?.close(); // it runs on, on its own
            qemu?.close(); // the VM, told to run, runs on
            m?.complete({ ...report, guest_pid: pid() ?? 0 } as ReceiveReport);
            if (m) d.metrics.finished(m);
          },
          (e: unknown) => {
            if (arriving !== undefined) this.#arriving.delete(arriving);
            // post-copy that cannot finish: the guest's missing pages exist nowhere any more
            if ((e as { phase?: string }).phase === 'postcopy') (guest ?? qemu)?.kill();
            else guest?.close();
            qemu?.close(); // a QEMU not told to run is stopped: it has no lease of its own and would wait forever
            // a refusal was recorded and counted as such (#refused) before this
            if (isRefusedBeforeReserving(e)) return;
            trace('daemon', DaemonEvent.incomingFailed, { reason: (e as Error).message });
            if (m && !m.done) {
              m.fail(e);
              d.metrics.finished(m);
            }
          },
        );
      },
    };
  }

  /**
   * Refuses a guest whose name is taken here: listed, coming in, or arrived and not registered
   * yet (its process alive). Names are how operators and the registry tell guests apart.
   */
  #claimName(d: IncomingDeps, name: string | undefined): void {
    if (name === undefined) return;
    const taken = (why: string): LivemigError =>
      new LivemigError('ERR_LIVEMIG_CONFLICT', `a guest named ${name} is ${why} here: one name, one guest`, { phase: 'reserve' });
    if (this.#arriving.has(name)) {
      const pid = this.#arriving.get(name);
      // no pid: still coming in; a pid: arrived, and registers once it has checked its pages
      if (pid === undefined) throw taken('coming in');
      if (alive(pid) && !d.guests.listed(name)) throw taken('running (not registered yet)');
      this.#arriving.delete(name);
    }
    if (d.guests.listed(name)) throw taken('registered');
    this.#arriving.set(name, undefined);
  }

  async close(): Promise<void> {
    await this.receiver.close();
  }
}

/** The incoming migration a HELLO begins, listed under the guest's name (or its regions' names, from a source that gave none). */
function recordArrival(d: IncomingDeps, e: Extract<ReceiveProgress, { type: 'hello' }>): Migration {
  const m = new Migration({
    direction: 'incoming',
    guest: e.guest ?? (e.regions.map((r) => r.name).join('+') || 'guest'),
    peer: e.peer,
    totalBytes: e.region_bytes,
    bus: d.bus,
    settings: INCOMING_SETTINGS,
  });
  d.table.add(m);
  m.setStage('reserve');
  m.setState('running');
  return m;
}

/** An incoming migration's stage and progress, from its receiver's events after HELLO. */
function followArrival(m: Migration, e: ReceiveProgress, received: { pages: number }): void {
  switch (e.type) {
    case 'reserved':
      m.setStage('receiving');
      m.passedHandshake();
      break;
    case 'round':
      received.pages += e.pages;
      m.noteProgress(arrivedSample('receiving', received.pages * PAGE_SIZE, m.progress.view.total_bytes), { now: true });
      break;
    case 'committed':
      m.setStage('committed');
      break;
    case 'postcopy-running':
      m.setStage('postcopy');
      break;
    case 'postcopy-progress':
      m.noteProgress(arrivedSample('postcopy', (received.pages + e.pages_pulled + e.pages_pushed) * PAGE_SIZE, m.progress.view.total_bytes));
      break;
    default:
      break;
  }
}

/** Whether process `pid` exists (one of another user's counts). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** An incoming migration's progress as a destination knows it: what arrived, not what the source will still find dirty. */
function arrivedSample(stage: string, bytes: number, totalBytes: number): ProgressSample {
  return { at: performance.now(), stage, movedBytes: bytes, remainingBytes: Math.max(0, totalBytes - bytes), wireBytes: bytes };
}
