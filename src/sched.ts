/**
 * Latency hint for a process whose threads hand a guest over. On a host where every CPU is
 * busy (the guest, the sender, the receiver), a thread woken by a control message waits for
 * the running thread's slice to end: ~2 ms per hop measured on this 2-CPU host, and the
 * hand-over is a chain of such hops inside the downtime. A shorter EEVDF slice (Linux >= 6.12)
 * lets the woken thread run at once. Threads and processes created later inherit the slice.
 */
import { readdirSync } from 'node:fs';
import os from 'node:os';
import { LivemigError } from './errors.js';
import { addon, call } from './native.js';

export interface SliceResult {
  /** threads of this process that now ask for the slice */
  threads: number;
  /** false when the kernel does not take custom slices (before 6.12): nothing changed */
  applied: boolean;
}

export const DEFAULT_SLICE_US = 100;

/** Asks for `us`-microsecond slices for every fair-class thread of this process. */
export function preferShortSlices(us: number = DEFAULT_SLICE_US): SliceResult {
  // the kernel accepts 0.1..100 ms; below that a slice is all switching
  if (!Number.isFinite(us) || us < 100 || us > 100_000) {
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `slice must be within 100..100000 µs, got ${String(us)}`, { phase: 'setup' });
  }
  return call('ERR_LIVEMIG_SYSCALL', 'setup', 'asking for short slices', () => addon.setShortSlices(Math.round(us * 1000)));
}

/**
 * Back to the kernel's default slice for every thread of this process: for a guest started
 * by a livemig process, which would otherwise inherit livemig's hint and compete with it.
 */
export function defaultSlices(): SliceResult {
  return call('ERR_LIVEMIG_SYSCALL', 'setup', 'going back to default slices', () => addon.setShortSlices(0));
}

/**
 * Sets the nice value of every thread of this process (Linux's nice is per thread: setting the
 * process's alone changes only the calling thread, and libuv's pool threads, which carry the
 * data path, already exist). Threads created later inherit it from their creator.
 */
export function setProcessNice(nice: number): number {
  if (!Number.isInteger(nice) || nice < -20 || nice > 19)
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `a nice value is an integer in -20..19, got ${String(nice)}`, { phase: 'setup' });
  let threads = 0;
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      os.setPriority(Number(tid), nice);
      threads++;
    } catch (e) {
      // a thread that ended meanwhile is fine; a refusal (EACCES below 0 without the right) is not
      if ((e as NodeJS.ErrnoException).code === 'ESRCH') continue;
      throw new LivemigError('ERR_LIVEMIG_SYSCALL', `cannot set nice ${nice}: ${(e as Error).message} (below 0 needs root or CAP_SYS_NICE)`, {
        phase: 'setup',
        cause: e,
      });
    }
  }
  return threads;
}

/**
 * Every thread of process `pid` (0: this one) to SCHED_IDLE: it runs only where no other thread
 * wants the CPU. For work left once the guest runs at the destination (a source QEMU's quit): on
 * a 2-CPU host, a source QEMU quitting at normal priority
 * beside the destination's first milliseconds left the VM silent 24-41 ms after the hand-over,
 * 12-17 ms with its quit put off (bench/qemu, 512 MiB/s). Returns how many threads moved; a
 * process gone meanwhile moves none.
 */
export function idleProcess(pid: number, phase: string): number {
  try {
    return addon.idleProcess(pid);
  } catch (e) {
    if ((e as { errnoName?: string }).errnoName === 'ENOENT') return 0;
    throw new LivemigError('ERR_LIVEMIG_SYSCALL', `cannot move process ${pid || process.pid} to idle priority: ${(e as Error).message}`, {
      phase,
      cause: e,
    });
  }
}
