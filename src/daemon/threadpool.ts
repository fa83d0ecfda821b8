/**
 * libuv's thread pool for a daemon. livemig's native reads and sends run as pool tasks that
 * block on their connection (native/common.h, Task), so each running migration holds pool
 * threads while it waits for its peer: with more migrations than the pool has threads (4 by
 * default) they all stall until their peers time out (measured: 5 at once, 4 failed after 30 s).
 * libuv reads UV_THREADPOOL_SIZE once, when the process first uses the pool, which Node does
 * while it loads the program: a daemon is therefore started with it set, and `livemig serve`
 * without it runs itself again with it.
 */
import { spawn } from 'node:child_process';
import os from 'node:os';

/** pool threads a migration may hold at once, and the pool's threads for the rest (sized as if --parallel were --max-migrations) */
export const POOL_PER_MIGRATION = 4;
export const POOL_BASE = 8;

/**
 * Channels for one of `concurrent` migrations running at once: its share of the cores (1 to
 * 4), within the pool threads a migration may hold (its channels' sends or reads, and one more).
 */
export function channelsFor(concurrent: number): number {
  return Math.max(1, Math.min(4, Math.floor(os.availableParallelism() / Math.max(1, concurrent)), POOL_PER_MIGRATION - 1));
}

export function poolFor(maxMigrations: number): number {
  return Math.min(1024, POOL_BASE + 2 * POOL_PER_MIGRATION * maxMigrations);
}

/** How many migrations at once (each direction) the pool of this process carries. */
export function migrationsCarried(): number {
  // (read here, not through native.ts's threadPoolSize: the command's entry imports this file
  // before anything else, and must not load the addon to decide whether to run itself again)
  const pool = Number(process.env['UV_THREADPOOL_SIZE'] ?? 4);
  return Math.max(1, Math.floor(((Number.isFinite(pool) ? pool : 4) - POOL_BASE) / (2 * POOL_PER_MIGRATION)));
}

/** The pool `livemig serve` with these arguments needs, when this process was started without one. */
export function poolNeeded(argv: readonly string[]): number | undefined {
  if (process.env['UV_THREADPOOL_SIZE'] !== undefined || argv.includes('--help') || argv.includes('-h')) return undefined;
  // a migration with more channels than the default pool carries (each holds a thread: src/source/channels.ts)
  if (argv[0] === 'send' || argv[0] === 'demo') {
    const c = flagValue(argv, '--channels');
    const n = Number(c);
    return c !== undefined && Number.isInteger(n) && n > 2 && n <= 16 ? n + 4 : undefined;
  }
  if (argv[0] !== 'serve') return undefined;
  const i = argv.findIndex((a) => a === '--max-migrations' || a.startsWith('--max-migrations='));
  const given = i < 0 ? 16 : Number(argv[i]!.includes('=') ? argv[i]!.split('=')[1] : argv[i + 1]);
  // a bad value is the flag parser's to refuse (in the process run again)
  return poolFor(Number.isInteger(given) && given > 0 ? given : 16);
}

function flagValue(argv: readonly string[], name: string): string | undefined {
  const i = argv.findIndex((a) => a === name || a.startsWith(`${name}=`));
  if (i < 0) return undefined;
  return argv[i]!.includes('=') ? argv[i]!.split('=')[1] : argv[i + 1];
}

/** Runs this command again with the pool sized; resolves with its exit code. Signals are passed on. */
export function runWithPool(size: number): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], {
    stdio: 'inherit',
    env: { ...process.env, UV_THREADPOOL_SIZE: String(size) },
  });
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, () => void child.kill(sig));
  return new Promise((resolve) =>
    child.on('exit', (code, signal) => {
      if (signal) process.stderr.write(`livemig: the process run with the pool ended by ${signal}\n`);
      resolve(code ?? (signal ? 128 : 1));
    }),
  );
}
