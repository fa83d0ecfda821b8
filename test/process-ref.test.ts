/**
 * A process remembered by pid and start time (src/process-ref.ts): a signal reaches it while it
 * runs, and never the process that holds its pid after it.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';
import { isSameProcess, processRef, processStart, signalProcess } from '../src/process-ref.js';

test('a remembered process is signalled only while its pid still names it', async () => {
  const child = spawn('sleep', ['30'], { stdio: 'ignore' });
  const exited = once(child, 'exit');
  const ref = processRef(child.pid!);
  assert.ok(ref, 'a running process has a start time');
  assert.equal(isSameProcess(ref), true);
  // the same pid with another start time stands for the process that takes the pid later
  const stranger = { pid: ref.pid, start: String(Number(ref.start) + 1) };
  assert.equal(signalProcess(stranger, 'SIGKILL'), false, 'another process holding the pid is left alone');
  assert.equal(child.exitCode ?? child.signalCode, null, 'and it runs on');
  assert.equal(signalProcess(ref, 'SIGKILL'), true);
  await exited;
  assert.equal(child.signalCode, 'SIGKILL');
  assert.equal(processStart(ref.pid), undefined, 'reaped: no process has the pid');
  assert.equal(signalProcess(ref, 'SIGKILL'), false, 'a process gone is not signalled');
  assert.equal(processRef(ref.pid), undefined);
});
