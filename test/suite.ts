/**
 * The whole suite, as `npm test` runs it: every test file in a process of its own, a few at
 * a time, the longest first.
 *
 * Files can run side by side because they share nothing a verdict depends on: each listens on
 * port 0 (the fault matrix alone makes network namespaces, named lmf-*, and listens inside
 * them), and no test asserts a timing (figures that depend on the CPU belong in bench/). What
 * the parallelism changes is how long the suite takes. The fault matrix mostly waits (a
 * fault lasts 20 s by design): it starts first and holds one slot, while the other files, which
 * keep the CPU busy, run one after another beside it. Node's own `--test` sorts the files by
 * name instead, so the matrix would start late and run alone.
 *
 *   node dist/test/suite.js [FILE.test.js ...]       (default: every dist/test/*.test.js)
 *   LIVEMIG_TEST_CONCURRENCY=N                        (default 2; 1 runs the files one by one)
 *
 * Every file and every process it starts gets a temporary directory of this run's own (TMPDIR),
 * removed when the suite ends: a guest a test kills cannot remove its socket's directory, and
 * runs of the suite had left hundreds in /tmp.
 */
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from 'node:test';
import { spec, tap } from 'node:test/reporters';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
/** the files that take longest, started first (by name; the rest follow in name order) */
const LONGEST_FIRST = ['faults', 'daemon', 'e2e', 'postcopy', 'convergence', 'channels', 'deadlines', 'lease'];

function concurrency(): number {
  const raw = process.env['LIVEMIG_TEST_CONCURRENCY'] ?? '2';
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1 || n > 16) throw new Error(`LIVEMIG_TEST_CONCURRENCY must be an integer from 1 to 16, not '${raw}'`);
  return n;
}

function suiteFiles(): string[] {
  const all = readdirSync(here)
    .filter((f) => f.endsWith('.test.js'))
    .sort();
  const rank = (f: string): number => {
    const i = LONGEST_FIRST.indexOf(f.replace(/\.test\.js$/, ''));
    return i < 0 ? LONGEST_FIRST.length : i;
  };
  return all.sort((a, b) => rank(a) - rank(b)).map((f) => path.join(here, f));
}

const asked = process.argv.slice(2).map((f) => path.resolve(f));
const scratch = mkdtempSync(path.join(os.tmpdir(), 'livemig-suite-'));
process.env['TMPDIR'] = scratch;
process.on('exit', () => rmSync(scratch, { recursive: true, force: true }));
const stream = run({ files: asked.length ? asked : suiteFiles(), concurrency: concurrency() });
stream.on('test:fail', () => {
  process.exitCode = 1;
});
stream.compose(process.stdout.isTTY ? new spec() : tap).pipe(process.stdout);
