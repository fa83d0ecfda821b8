/**
 * A paused guest is never left paused by a source engine that stalls or dies before its point
 * of commitment (issue 18): the pause carries a lease; silence past it, or livemig's end of the
 * control socket closing, resumes the guest by itself. After livemig says it commits ('C'), the
 * guest never resumes by itself, and a guest that already resumed refuses the commitment.
 */
import assert from 'node:assert/strict';
import dgram from 'node:dgram';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { SourceGuest } from '../src/workload/controller.js';

/** Heartbeats of one guest: how many arrived since the last call. */
async function beatCounter(): Promise<{ address: string; since(): number; close(): void }> {
  const sock = dgram.createSocket('udp4');
  let n = 0;
  sock.on('message', () => void n++);
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  return {
    address: `127.0.0.1:${sock.address().port}`,
    since: () => {
      const k = n;
      n = 0;
      return k;
    },
    close: () => sock.close(),
  };
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** Beats sent before a pause may still be in flight when it returns: let them land, and forget them. */
async function settle(beats: { since(): number }): Promise<void> {
  await sleep(20);
  beats.since();
}

test('a pause with a lease: silence past it resumes the guest, and it then refuses to commit', async () => {
  const beats = await beatCounter();
  const guest = await SourceGuest.spawn({ size: 1 << 20, content: 'mixed', rate: 1, pattern: 'uniform', heartbeat: beats.address });
  try {
    await sleep(100);
    assert.ok(beats.since() > 0, 'the guest beats while it runs');
    await guest.pause({ maxPauseMs: 200 }); // lease: 200 ms + the slack
    await settle(beats);
    await sleep(300);
    assert.equal(beats.since(), 0, 'paused within its lease: no beat');
    await sleep(1200);
    assert.ok(beats.since() > 0, 'past its lease the guest resumed by itself');
    await assert.rejects(guest.commit(), (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_GUEST' && /resumed itself/.test(e.message));
  } finally {
    guest.kill();
    beats.close();
  }
});

test('after the commitment a paused guest stays paused past its lease and after livemig goes away', async () => {
  const beats = await beatCounter();
  const guest = await SourceGuest.spawn({ size: 1 << 20, content: 'mixed', rate: 1, pattern: 'uniform', heartbeat: beats.address });
  try {
    await guest.pause({ maxPauseMs: 100 });
    await guest.commit();
    await settle(beats);
    await sleep(1500);
    assert.equal(beats.since(), 0, 'committed: no resume by itself');
    await guest.resume(); // the destination said it did not activate: resumed here, as livemig decides
    await sleep(100);
    assert.ok(beats.since() > 0, 'resumed by livemig');
    await guest.pause({ maxPauseMs: 60_000 });
    await guest.commit();
    await settle(beats);
    guest.detach(); // livemig dies after committing
    await sleep(300);
    assert.equal(beats.since(), 0, 'committed and orphaned: it stays paused (it may run at the destination)');
  } finally {
    guest.child.kill('SIGKILL');
    beats.close();
  }
});

test('livemig going away while the guest is paused before the commitment resumes it at once', async () => {
  const beats = await beatCounter();
  const guest = await SourceGuest.spawn({ size: 1 << 20, content: 'mixed', rate: 1, pattern: 'uniform', heartbeat: beats.address });
  try {
    await guest.pause({ maxPauseMs: 60_000 });
    await settle(beats);
    await sleep(100);
    assert.equal(beats.since(), 0, 'paused');
    guest.detach(); // livemig's end of both control sockets closes (as when its process dies)
    await sleep(200);
    assert.ok(beats.since() > 0, 'resumed by itself, long before its lease');
  } finally {
    guest.child.kill('SIGKILL');
    beats.close();
  }
});
