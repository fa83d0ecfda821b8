/**
 * The largest region a receiver takes when it was not told: what the kernel says is available
 * now (MemAvailable), minus a reserve for everything else on the host, so that a peer cannot
 * make this host reserve (and populate) memory it does not have.
 */
import { readFileSync } from 'node:fs';

/** Kept free for the host: an eighth of MemTotal, at least 512 MiB. */
export function memoryBudget(meminfo = readMeminfo()): { bytes: number; why: string } | undefined {
  const kib = (name: string): number | undefined => {
    const m = new RegExp(`^${name}:\\s+(\\d+) kB$`, 'm').exec(meminfo);
    return m ? Number(m[1]) * 1024 : undefined;
  };
  const available = kib('MemAvailable');
  const total = kib('MemTotal');
  if (available === undefined || total === undefined) return undefined;
  const reserve = Math.max(512 << 20, Math.floor(total / 8));
  const bytes = Math.max(0, available - reserve);
  return { bytes, why: `MemAvailable ${(available / 2 ** 20).toFixed(0)} MiB minus a reserve of ${(reserve / 2 ** 20).toFixed(0)} MiB` };
}

function readMeminfo(): string {
  try {
    return readFileSync('/proc/meminfo', 'utf8');
  } catch {
    return ''; // no /proc: no default budget (the integrator's maxRegionBytes still applies)
  }
}
