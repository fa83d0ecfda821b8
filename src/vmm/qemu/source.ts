/**
 * A running QEMU VM as a livemig source guest, through QMP: its RAM is the shared file of its
 * memory backend (livemig reads it, and tracks QEMU's writes exactly where the preload library
 * registered QEMU's mapping for userfaultfd WP_ASYNC: docs/QEMU.md, else by hashing); a pause is
 * one `migrate` of QEMU's own, in which QEMU stops the VM and streams its device state
 * (x-ignore-shared: its RAM stays out); a resume is `cont`; the release is `quit`. A VM that
 * stays here gets its QEMU's migration settings back.
 *
 * The lease: a pause not committed within its lease resumes the VM (`cont`), and the commitment
 * is then refused, so a stalled peer never leaves the VM paused.
 */
import { closeSync } from 'node:fs';
import { LivemigError } from '../../errors.js';
import { addon, closeFd } from '../../native.js';
import { GuestLayout } from '../../guest/layout.js';
import { Region } from '../../region/region.js';
import type { MigrateOptions, PauseLease } from '../../source/types.js';
import type { SourceDisk } from '../../disk/spec.js';
import { prepareMigration, saveDeviceState, type MigrationSettings } from './device-state.js';
import { SourceKeeper } from './keeper.js';
import { qemuDisks } from './disks.js';
import { qemuRam, type QemuRam } from './memory.js';
import { QmpClient } from './qmp.js';
import { VcpuThrottle } from './throttle.js';
import { trace } from '../../trace.js';
import { SourceEvent } from '../../trace-events.js';
import { idleProcess } from '../../sched.js';

/** a paused VM's lease runs this much past livemig's max pause (whose abort resumes it first) */
const LEASE_SLACK_MS = 1000;
const STATE_TIMEOUT_MS = 10_000;

export class QemuSource {
  readonly qmp: QmpClient;
  readonly ram: QemuRam;
  readonly region: Region;
  readonly layout: GuestLayout;
  /** how QEMU's writes are followed, and why */
  readonly tracking: { exact: boolean; reason: string };
  /** the VM's raw images, open read-only (src/vmm/qemu/disks.ts) */
  disks: SourceDisk[] = [];
  #paused = false;
  #committed = false;
  #leaseTimer: NodeJS.Timeout | undefined;
  #leaseFired: Promise<void> | undefined;
  #closed = false;
  /** the device state's save, settled (QEMU's migrate is over) */
  #saving: Promise<void> = Promise.resolve();
  readonly #throttle: VcpuThrottle | undefined;
  /** why the VM cannot be throttled (undefined: it can, through its vCPUs' cgroup) */
  readonly throttleRefusal: string | undefined;

  readonly #settings: MigrationSettings;
  /** resumes the VM if this process dies with the VM paused and not committed */
  readonly #keeper: SourceKeeper;
  /** the VM ran when livemig took it (one the operator had paused stays paused) */
  readonly #wasRunning: boolean;

  private constructor(
    qmp: QmpClient,
    ram: QemuRam,
    tracking: { exact: boolean; reason: string },
    vcpus: number[],
    settings: MigrationSettings,
    wasRunning: boolean,
  ) {
    this.qmp = qmp;
    this.ram = ram;
    this.#settings = settings;
    this.#keeper = new SourceKeeper(qmp.fd, settings.restoreLines);
    this.#wasRunning = wasRunning;
    const t = VcpuThrottle.open(qmp.pid, vcpus);
    this.#throttle = t instanceof VcpuThrottle ? t : undefined;
    this.throttleRefusal = t instanceof VcpuThrottle ? undefined : t.reason;
    this.region = Region.adoptPieces([{ fd: ram.fd, offset: 0, size: ram.size }]);
    this.layout = GuestLayout.single(ram.size, ram.id);
    this.tracking = tracking;
  }

  /**
   * Takes the VM at QMP socket `path`: refused, the VM untouched, unless it runs with its RAM on a
   * shared file and its disks are raw images on local storage. `onConnected`: QEMU answered (a
   * refusal from here on leaves a VM running).
   */
  static async attach(path: string, onConnected?: () => void): Promise<QemuSource> {
    const qmp = await QmpClient.connect(path);
    onConnected?.();
    let ram: QemuRam[] = [];
    let disks: SourceDisk[] = [];
    try {
      const status = await qmp.execute<{ status: string }>('query-status');
      if (status.status !== 'running' && status.status !== 'paused')
        throw new LivemigError('ERR_LIVEMIG_QEMU', `the VM is ${status.status}, not running: nothing to migrate`, { phase: 'qemu' });
      ram = await qemuRam(qmp);
      disks = await qemuDisks(qmp);
      const settings = await prepareMigration(qmp, 'source');
      const cpus = await qmp.execute<{ 'thread-id': number }[]>('query-cpus-fast');
      const vcpus = Array.isArray(cpus) ? cpus.map((c) => c['thread-id']).filter((t) => Number.isSafeInteger(t) && t > 0) : [];
      const vm = new QemuSource(qmp, ram[0]!, trackingOf(qmp.pid, ram[0]!), vcpus, settings, status.status === 'running');
      vm.disks = disks;
      return vm;
    } catch (e) {
      for (const r of [...ram, ...disks]) closeSync(r.fd);
      qmp.close();
      throw e;
    }
  }

  get pid(): number {
    return this.qmp.pid;
  }

  /** What migrate() needs of the VM's memory: exact tracking through QEMU's own mapping, or hashing. */
  get memory(): Pick<MigrateOptions, 'region' | 'layout' | 'target' | 'untracked' | 'disks'> {
    return {
      region: this.region,
      layout: this.layout,
      ...(this.tracking.exact ? { target: { pid: this.pid, address: this.ram.address } } : { untracked: true }),
      ...(this.disks.length ? { disks: this.disks } : {}),
    };
  }

  /** QEMU stops the VM and streams its device state (one `migrate`); the lease starts. */
  async pause(lease: PauseLease): Promise<Buffer> {
    this.#paused = true; // from the command on: a failure half-way resumes it
    this.#committed = false;
    if (this.#wasRunning) this.#keeper.set('paused');
    this.#leaseFired = undefined;
    this.#leaseTimer = setTimeout(() => {
      // livemig went quiet: the VM runs again here, and no commitment may follow
      this.#leaseFired = this.#cont();
      this.#leaseFired.catch(() => undefined);
    }, lease.maxPauseMs + LEASE_SLACK_MS);
    let stopped = false;
    const off = this.qmp.onEvent((e) => {
      if (e.event === 'STOP') {
        stopped = true;
        lease.onStopped?.(performance.now()); // as heard: the VM stopped at most this QMP event's way earlier
        trace('source', SourceEvent.qemuStopped);
      } else if (stopped && e.event === 'MIGRATION_PASS') {
        // QEMU's first dirty-bitmap sync after the stop: its vCPUs are paused and its block
        // layer drained and flushed (vm_stop comes first), and it writes no guest RAM while it
        // saves its devices. The last pages may go now.
        stopped = false;
        lease.onHalted?.();
      }
    });
    // a vCPU out of its quota may hold QEMU's big lock, which the stop waits for (300 ms seen)
    if (this.#throttle?.percent) this.#throttle.release();
    const saving = saveDeviceState(this.qmp, STATE_TIMEOUT_MS);
    this.#saving = saving.then(
      () => undefined,
      () => undefined,
    );
    try {
      return await saving;
    } catch (e) {
      await this.resume().catch(() => undefined); // the rollback resumes it too; a VM is never left stopped
      throw e;
    } finally {
      off();
    }
  }

  /** The point of commitment: refused when the lease already resumed the VM. */
  async commit(): Promise<void> {
    if (this.#leaseFired || !this.#paused)
      throw new LivemigError('ERR_LIVEMIG_GUEST', 'the VM is running again (its lease ran out): no commitment', { phase: 'commit' });
    clearTimeout(this.#leaseTimer);
    // before the destination can hear of it: a keeper that resumed a committed VM would make two
    this.#keeper.set('committed');
    this.#committed = true;
  }

  /**
   * The VM runs here again: after a failure before the commitment, or after it when the
   * destination said its activation failed and its copy is gone (livemig calls it then only).
   */
  async resume(): Promise<void> {
    clearTimeout(this.#leaseTimer);
    await this.#saving; // QEMU refuses `cont` while its migrate still runs (a failure beside the save)
    if (this.#leaseFired) return this.#leaseFired;
    this.#committed = false;
    await this.#cont();
  }

  async #cont(): Promise<void> {
    if (!this.#paused) return;
    // a migrate that failed before QEMU stopped the VM leaves it running: nothing to resume
    const { status } = await this.qmp.execute<{ status: string }>('query-status');
    if (status !== 'running' && this.#wasRunning) await this.qmp.execute('cont');
    this.#paused = false;
    this.#keeper.set('attached');
  }

  /** Slows the VM's vCPUs to (100 - percent)% (auto-converge); 0 releases. Only where throttleRefusal is undefined. */
  async throttle(percent: number): Promise<void> {
    if (percent === 0 && this.#closed) return; // released: QEMU is gone, and so is what it was throttled by
    if (!this.#throttle) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `the VM cannot be throttled: ${this.throttleRefusal}`, { phase: 'precopy' });
    this.#throttle.set(percent);
  }

  /** The VM runs at the destination: QEMU here quits, at idle priority. */
  async release(): Promise<void> {
    clearTimeout(this.#leaseTimer);
    // QEMU's quit is teardown (its RAM mapping, TCG's buffers): it yields the CPU to the VM
    // starting at the destination, which on a shared host it otherwise slows
    try {
      idleProcess(this.pid, 'release');
    } catch (e) {
      trace('source', SourceEvent.qemuQuitAtNormalPriority, { reason: (e as Error).message }); // a QEMU of another user: EPERM
    }
    const exited = this.qmp.waitEvent('SHUTDOWN', { timeoutMs: 5000 }).catch(() => undefined);
    await this.qmp.execute('quit').catch((e: unknown) => {
      if (!this.qmp.closed) throw e; // QEMU may close before it answers
    });
    await exited;
    this.close();
  }

  /** livemig lets go: a VM paused before the commitment runs again, its QEMU's settings as they were. */
  async detach(): Promise<void> {
    clearTimeout(this.#leaseTimer);
    try {
      if (this.#paused && !this.#committed) await this.#cont();
      if (!this.#committed) await this.#settings.restore();
    } finally {
      this.close();
    }
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#leaseTimer);
    this.#keeper.done();
    this.#throttle?.release(); // a VM that runs on here runs at full speed again
    this.qmp.close();
    if (!this.region.released) this.region.release();
    closeSync(this.ram.fd);
    for (const d of this.disks) closeSync(d.fd);
  }
}

/**
 * Exact tracking needs QEMU's mapping registered for userfaultfd WP_ASYNC (the preload library
 * does it inside QEMU); a PAGEMAP_SCAN that checks for it says whether it is.
 */
function trackingOf(pid: number, ram: QemuRam): { exact: boolean; reason: string } {
  let pagemap = -1;
  try {
    pagemap = addon.pagemapOpen(pid);
    addon.pagemapScanSync(pagemap, ram.address, ram.size, 4096, false);
    return { exact: true, reason: "uffd-async: QEMU's mapping of its RAM is registered for userfaultfd WP_ASYNC (the preload library)" };
  } catch (e) {
    const errno = (e as { errnoName?: string }).errnoName;
    const why =
      errno === 'EPERM'
        ? "QEMU's mapping of its RAM is not registered for write tracking (start QEMU with LD_PRELOAD of livemig's preload library: docs/QEMU.md)"
        : `PAGEMAP_SCAN of QEMU's mapping failed (${(e as Error).message})`;
    return { exact: false, reason: `hash: ${why}, so every page is hashed each round` };
  } finally {
    if (pagemap >= 0) closeFd(pagemap, 'qemu');
  }
}
