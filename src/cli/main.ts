#!/usr/bin/env node
/**
 * The `livemig` command's entry: a daemon runs with libuv's pool sized for its migrations
 * (src/daemon/threadpool.ts); functions compile eagerly (see src/eager.ts), then the command
 * loads.
 */
import { poolNeeded, runWithPool } from '../daemon/threadpool.js';

const pool = poolNeeded(process.argv.slice(2));
if (pool !== undefined) {
  process.exitCode = await runWithPool(pool);
} else {
  await import('../eager.js');
  await import('./cli.js');
}
