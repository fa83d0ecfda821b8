import { usageError as invalidArgument } from './flags.js';

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  kb: 1000,
  kib: 1024,
  m: 1 << 20,
  mb: 1e6,
  mib: 1 << 20,
  g: 1 << 30,
  gb: 1e9,
  gib: 1 << 30,
  t: 2 ** 40,
  tib: 2 ** 40,
};

/** "64MiB", "1GiB", "4096", "1.5G" -> bytes. */
export function parseSize(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) throw invalidArgument(`${what}: cannot read '${text}' as a size (examples: 4096, 64MiB, 1GiB)`);
  const v = Math.round(Number(m[1]) * unit);
  if (!Number.isSafeInteger(v) || v <= 0) throw invalidArgument(`${what}: '${text}' is not a positive size`);
  return v;
}

export function parseNumber(text: string, what: string, min = 0): number {
  const v = Number(text);
  // min = Number.MIN_VALUE asks for a positive number: say so, not ">= 5e-324"
  if (!Number.isFinite(v) || v < min || text.trim() === '')
    throw invalidArgument(`${what}: '${text}' must be ${min === Number.MIN_VALUE ? 'a positive number' : `a number >= ${min}`}`);
  return v;
}

export function parseHostPort(text: string, what: string): { host: string; port: number } {
  const i = text.lastIndexOf(':');
  const host = i > 0 ? text.slice(0, i) : '';
  const port = Number(text.slice(i + 1));
  if (!host || !Number.isInteger(port) || port < 0 || port > 65535) throw invalidArgument(`${what}: expected HOST:PORT, got '${text}'`);
  return { host, port };
}
