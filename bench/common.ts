import os from 'node:os';

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function machine(): Record<string, unknown> {
  return { kernel: os.release(), cpus: os.cpus().length, cpu: os.cpus()[0]?.model, mem_gib: Math.round(os.totalmem() / 2 ** 30), node: process.version };
}

export function emit(record: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify({ ...record, date: new Date().toISOString() }) + '\n');
}

export const nowMs = (): number => performance.now();
