/**
 * Slowing a QEMU VM's writes while livemig copies it (auto-converge): QEMU has no throttle of
 * its own outside its own migration, so its vCPU threads (query-cpus-fast's thread-id) go
 * into a CPU cgroup of their own, its bandwidth (CFS quota) cut to (100 - percent)% of theirs.
 * The cgroup v1 `cpu` controller takes single threads; a cgroup v2 hierarchy would need a
 * threaded subtree, which is not built: there the VM is not throttled, and the reason says so.
 */
import { mkdirSync, readFileSync, readdirSync, rmdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { LivemigError } from '../../errors.js';

// short periods: a vCPU thread out of quota may hold QEMU's big lock, and everything else in
// QEMU (its main loop, the migration thread) waits for it until the next period
const PERIOD_US = 10_000;

/** Where the cgroup v1 `cpu` controller is mounted, or undefined. */
function cpuMount(): string | undefined {
  for (const line of readFileSync('/proc/self/mounts', 'utf8').split('\n')) {
    const [, dir, type, opts] = line.split(' ');
    if (type === 'cgroup' && opts?.split(',').includes('cpu')) return dir;
  }
  return undefined;
}

export class VcpuThrottle {
  readonly #pid: number;
  readonly #threads: readonly number[];
  readonly #dir: string;
  /** each vCPU thread's cgroup before, to go back to */
  readonly #home = new Map<number, string>();
  #percent = 0;

  private constructor(pid: number, threads: readonly number[], dir: string) {
    this.#pid = pid;
    this.#threads = threads;
    this.#dir = dir;
  }

  /** A throttle for QEMU `pid` whose vCPUs run on `threads`, or why there is none. */
  static open(pid: number, threads: readonly number[]): VcpuThrottle | { reason: string } {
    const mount = cpuMount();
    if (!mount) return { reason: 'no cgroup v1 cpu controller is mounted (cgroup v2 threaded subtrees are not built), so the VM is not throttled' };
    const own = new Set(readdirSync(`/proc/${pid}/task`).map(Number));
    if (threads.length === 0 || !threads.every((t) => own.has(t)))
      return { reason: `QEMU (pid ${pid}) reported vCPU threads ${threads.join(', ')}, not all its own` };
    return new VcpuThrottle(pid, threads, path.join(mount, `livemig-qemu-${pid}`));
  }

  get percent(): number {
    return this.#percent;
  }

  /** Cuts the vCPUs' CPU to (100 - percent)%; 0 gives it back. */
  set(percent: number): void {
    if (!Number.isInteger(percent) || percent < 0 || percent > 99)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `throttle percent must be an integer in 0..99, got ${percent}`, { phase: 'precopy' });
    if (percent === 0) return this.release();
    try {
      const threads = this.#threads;
      mkdirSync(this.#dir, { recursive: true });
      writeFileSync(path.join(this.#dir, 'cpu.cfs_period_us'), String(PERIOD_US));
      const quota = Math.max(1000, Math.round((threads.length * PERIOD_US * (100 - percent)) / 100));
      writeFileSync(path.join(this.#dir, 'cpu.cfs_quota_us'), String(quota));
      for (const tid of threads) {
        if (!this.#home.has(tid)) this.#home.set(tid, this.#cgroupOf(tid));
        writeFileSync(path.join(this.#dir, 'tasks'), String(tid));
      }
      this.#percent = percent;
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_SYSCALL', `throttling QEMU's vCPUs through ${this.#dir}: ${(e as Error).message}`, { phase: 'precopy', cause: e });
    }
  }

  /** The vCPUs back where they were; the cgroup goes. */
  release(): void {
    const mount = path.dirname(this.#dir);
    for (const [tid, home] of this.#home) {
      try {
        writeFileSync(path.join(mount, home, 'tasks'), String(tid));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e; // a thread that ended needs no moving
      }
    }
    this.#home.clear();
    this.#percent = 0;
    this.#removeGroup(20);
  }

  // Threads of a QEMU that just quit stay in the group until they are reaped (EBUSY): tried
  // again a few times off this call, and said if it stays
  #removeGroup(tries: number): void {
    try {
      rmdirSync(this.#dir);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code === 'EBUSY' && tries > 0) {
        setTimeout(() => this.#removeGroup(tries - 1), 50).unref();
        return;
      }
      process.stderr.write(`livemig: the throttle's cgroup ${this.#dir} stays: ${(e as Error).message}\n`);
    }
  }

  #cgroupOf(tid: number): string {
    for (const line of readFileSync(`/proc/${this.#pid}/task/${tid}/cgroup`, 'utf8').split('\n')) {
      const [, controllers, where] = line.split(':');
      if (controllers?.split(',').includes('cpu')) return where ?? '/';
    }
    return '/';
  }
}
