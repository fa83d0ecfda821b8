/**
 * idleProcess (src/sched.ts): every thread of another process moves to SCHED_IDLE (a source
 * QEMU quits so, once its VM runs at the destination); a process gone moves none.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { readdirSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { idleProcess } from '../src/sched.js';

const SCHED_IDLE = 5;

/** the scheduling policy of each thread of `pid` (field 41 of /proc/PID/task/TID/stat) */
function policies(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[41 - 3]);
  });
}

test('every thread of a process goes to idle priority, and a process gone is no error', async () => {
  // a Node process has several threads (libuv's, V8's): all of them must move
  const child = spawn(process.execPath, ['-e', 'setInterval(() => {}, 1000); process.stdout.write("up\\n")'], { stdio: ['ignore', 'pipe', 'ignore'] });
  await once(child.stdout!, 'data');
  try {
    const before = policies(child.pid!);
    assert.ok(before.length > 1 && before.every((p) => p !== SCHED_IDLE), `not idle yet: ${before}`);
    // (threads may come and go meanwhile: the count is checked loosely, the outcome exactly)
    assert.ok(idleProcess(child.pid!, 'test') > 1);
    assert.deepEqual(
      policies(child.pid!).filter((p) => p !== SCHED_IDLE),
      [],
    );
  } finally {
    child.kill('SIGKILL');
    await once(child, 'exit');
  }
  assert.equal(idleProcess(child.pid!, 'test'), 0, 'gone: no thread moved');
});
