/**
 * Latency hint for a process whose threads hand a guest over. On a host where every CPU is
 * busy (the guest, the sender, the receiver), a thread woken by a control message waits for
 * the running thread's slice to end: ~2 ms per hop measured on this 2-CPU host, and the
 * hand-over is a chain of such hops inside the downtime. A shorter EEVDF slice (Linux >= 6.12)
 * lets the woken thread run at once. Threads and processes created later inherit the slice.
 */
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
