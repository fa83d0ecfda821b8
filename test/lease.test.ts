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
import { monotonicMs } from '../src/workload/clock.js';
import { SourceGuest } from '../src/workload/controller.js';

/** a paused guest's lease runs this much past the max pause livemig gives it (src/guest/source-session.ts) */
const LEASE_SLACK_MS = 1000;
/** how long a guest may take to beat once it runs again, on a loaded host: a bound, not a verdict */
const BOUND_MS = 30_000;

interface Beat {
  seq: number;
  /** when the guest sent it (CLOCK_MONOTONIC, ms) */
  t: number;
}

/**
 * Heartbeats of one guest. A pause reports the sequence number of the guest's next beat
 * (heartbeatSeq in its state, taken under the same lock as each beat's): a beat numbered from
 * it on was sent after the guest ran again, however late a busy host delivers the ones before.
 */
async function beatLog(): Promise<{ address: string; from(seq: number): Beat[]; first(seq: number): Promise<Beat>; close(): void }> {
  const sock = dgram.createSocket('udp4');
  const beats: Beat[] = [];
  let wake: (() => void)[] = [];
  sock.on('message', (m) => {
    try {
      const b = JSON.parse(m.toString()) as Beat;
      beats.push({ seq: b.seq, t: b.t });
    } catch {
      return; // not a heartbeat
    }
    for (const w of wake.splice(0)) w();
  });
  await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
  const from = (seq: number): Beat[] => beats.filter((b) => b.seq >= seq);
  return {
    address: `127.0.0.1:${sock.address().port}`,
    from,
    /** the first beat numbered `seq` or later, waited for by event */
    async first(seq) {
      const until = performance.now() + BOUND_MS;
      while (from(seq).length === 0) {
        if (performance.now() > until) throw new Error(`no beat from ${seq} on within ${BOUND_MS} ms`);
        await new Promise<void>((r) => {
          const t = setTimeout(r, 100);
          wake.push(() => (clearTimeout(t), r()));
        });
      }
      return from(seq).sort((x, y) => x.seq - y.seq)[0]!;
    },
    close: () => {
      wake = [];
      sock.close();
    },
  };
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** Pauses the guest; the sequence number its next beat will carry. */
async function pause(guest: SourceGuest, maxPauseMs: number): Promise<number> {
  return (JSON.parse((await guest.pause({ maxPauseMs })).toString()) as { heartbeatSeq: number }).heartbeatSeq;
}

test('a pause with a lease: silence past it resumes the guest, and it then refuses to commit', async () => {
  const beats = await beatLog();
  const guest = await SourceGuest.spawn({ size: 1 << 20, content: 'mixed', rate: 1, pattern: 'uniform', heartbeat: beats.address });
  try {
    await beats.first(0); // the guest beats while it runs
    const asked = monotonicMs();
    const next = await pause(guest, 200); // lease: 200 ms + the slack
    // the first beat after the pause is the guest resuming by itself: past its lease, not within it
    const resumed = await beats.first(next);
    const after = resumed.t - asked;
    assert.ok(after >= 200 + LEASE_SLACK_MS - 1, `paused within its lease: no beat (the first came ${after.toFixed(1)} ms after the pause)`);
    await assert.rejects(guest.commit(), (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_GUEST' && /resumed itself/.test(e.message));
  } finally {
    guest.kill();
    beats.close();
  }
});

test('after the commitment a paused guest stays paused past its lease and after livemig goes away', async () => {
  const beats = await beatLog();
  const guest = await SourceGuest.spawn({ size: 1 << 20, content: 'mixed', rate: 1, pattern: 'uniform', heartbeat: beats.address });
  try {
    const next = await pause(guest, 100);
    await guest.commit();
    await sleep(1500); // past the lease (100 ms + the slack): a guest that resumed by itself has beaten since
    assert.deepEqual(beats.from(next), [], 'committed: no resume by itself');
    await guest.resume(); // the destination said it did not activate: resumed here, as livemig decides
    await beats.first(next); // resumed by livemig
    const again = await pause(guest, 60_000);
    await guest.commit();
    guest.detach(); // livemig dies after committing
    await sleep(300);
    assert.deepEqual(beats.from(again), [], 'committed and orphaned: it stays paused (it may run at the destination)');
  } finally {
    guest.child.kill('SIGKILL');
    beats.close();
  }
});

test('livemig going away while the guest is paused before the commitment resumes it at once', async () => {
  const beats = await beatLog();
  const guest = await SourceGuest.spawn({ size: 1 << 20, content: 'mixed', rate: 1, pattern: 'uniform', heartbeat: beats.address });
  try {
    const next = await pause(guest, 60_000);
    await sleep(100);
    assert.deepEqual(beats.from(next), [], 'paused');
    const gone = monotonicMs();
    guest.detach(); // livemig's end of both control sockets closes (as when its process dies)
    const resumed = await beats.first(next);
    assert.ok(resumed.t - gone < 60_000, `resumed by itself, long before its lease (${(resumed.t - gone).toFixed(1)} ms after livemig went)`);
  } finally {
    guest.child.kill('SIGKILL');
    beats.close();
  }
});
