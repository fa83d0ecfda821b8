/**
 * A process named by its pid and its start time. A pid alone names whatever process holds it
 * now: the kernel hands an exited process's pid to the next one (pid_max is 32768 on common
 * hosts, and a host running guests of ~70 threads each wraps it within minutes), so a signal
 * sent to a remembered pid can hit a stranger. The start time (field 22 of /proc/PID/stat) tells
 * the two apart.
 */
import { readFileSync } from 'node:fs';
import { LivemigError } from './errors.js';

export interface ProcessRef {
  readonly pid: number;
  /** clock ticks after boot when it started */
  readonly start: string;
}

/** When the process with `pid` started, or undefined when there is no such process. */
export function processStart(pid: number, phase = 'process'): string | undefined {
  let stat: string;
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ESRCH') return undefined;
    throw new LivemigError('ERR_LIVEMIG_SYSCALL', `cannot read /proc/${pid}/stat: ${(e as Error).message}`, { phase, cause: e });
  }
  // the command name (field 2) may hold spaces and parentheses: the fields after its last ')'
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
}

/** The process `pid` names now, or undefined when none does. */
export function processRef(pid: number): ProcessRef | undefined {
  const start = pid > 0 ? processStart(pid) : undefined;
  return start === undefined ? undefined : { pid, start };
}

/** Whether `ref`'s process still runs (a zombie counts: it holds its pid until reaped). */
export function isSameProcess(ref: ProcessRef): boolean {
  return processStart(ref.pid) === ref.start;
}

/**
 * Sends `signal` to `ref`'s process if its pid still names it; returns whether it was sent.
 * (A pid reused between the check and the signal would still be hit: the window is one
 * syscall wide, against the seconds a remembered pid otherwise stays exposed.)
 */
export function signalProcess(ref: ProcessRef, signal: NodeJS.Signals): boolean {
  if (!isSameProcess(ref)) return false;
  try {
    process.kill(ref.pid, signal);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ESRCH') return false;
    throw new LivemigError('ERR_LIVEMIG_SYSCALL', `cannot signal process ${ref.pid}: ${(e as Error).message}`, { phase: 'process', cause: e });
  }
}
