/**
 * A bounded, seeded fuzz of the receiver (issue 18, point 8): thousands of connections, each a
 * HELLO and one frame of any type, mutated, against one long-lived listener. Every one ends in
 * an ERR_LIVEMIG_* error (or, when the mutation made it an ATTACH or RESOLVE, in the listener's
 * answer), nothing activates, and descriptors and memory stay flat. bench/fuzz
 * runs the same generator a million times.
 */
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { test } from 'node:test';
import { listen } from '../src/receiver/listen.js';
import { FUZZ_PAGES, Rng } from './reference/fuzz.js';
import { ANSWERED, runFuzz } from './reference/fuzz-run.js';

const CASES = Number(process.env.LIVEMIG_FUZZ_CASES ?? 20_000);
const fds = (): number => readdirSync('/proc/self/fd').length;

test(`${CASES} mutated frames against one receiver: each ends in an ERR_LIVEMIG_* error, nothing activates, descriptors and memory stay flat`, async () => {
  let activated = 0;
  const rx = await listen('127.0.0.1', 0, { maxRegionBytes: FUZZ_PAGES * 4096, idleTimeoutMs: 2000, activate: async () => void activated++ });
  try {
    // a first round warms everything up (pools, code paths), then the measured one
    await runFuzz(rx, rx.port, new Rng(7n), 200);
    const fd0 = fds();
    const rss0 = process.memoryUsage().rss;
    const c = await runFuzz(rx, rx.port, new Rng(0x5eedn), CASES);
    const fd1 = fds();
    const rss1 = process.memoryUsage().rss;
    process.stdout.write(
      `# fuzz: ${c.cases} cases, outcomes ${JSON.stringify(c.outcomes)}; fds ${fd0} -> ${fd1}; rss ${(rss0 / 2 ** 20).toFixed(0)} -> ${(rss1 / 2 ** 20).toFixed(0)} MiB\n`,
    );
    assert.deepEqual(c.strange, [], 'every case ends in a LivemigError');
    assert.equal(c.cases, CASES);
    assert.ok((c.outcomes[ANSWERED] ?? 0) < CASES / 20, 'only a few first frames mutate into a question the listener answers');
    assert.equal(activated, 0, 'nothing activated');
    assert.ok(Object.keys(c.outcomes).length >= 3, `the mutations reach several checks: ${JSON.stringify(c.outcomes)}`);
    assert.ok(fd1 <= fd0 + 8, `descriptors stay flat (${fd0} -> ${fd1})`);
    assert.ok(rss1 - rss0 < 128 * 2 ** 20, `memory stays flat (${(rss0 / 2 ** 20).toFixed(0)} -> ${(rss1 / 2 ** 20).toFixed(0)} MiB)`);
  } finally {
    await rx.close();
  }
});
