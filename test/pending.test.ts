/**
 * The listener's pending connections (src/receiver/pending.ts): capped per address and
 * overall; over a cap the newcomer stays and the oldest connection of the crowded address that
 * made the least progress goes once its grace is over; a connection that proved the key is
 * never let go for an unproven one.
 */
import assert from 'node:assert/strict';
import type net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { PendingConnections, type PendingLimits } from '../src/receiver/pending.js';

/** A socket as the table sees it: an address, whether it was destroyed. */
function fake(remoteAddress: string): net.Socket & { gone: boolean } {
  const s = {
    remoteAddress,
    gone: false,
    destroy() {
      s.gone = true;
      s.remoteAddress = undefined as unknown as string; // as a destroyed socket: it no longer says
    },
  };
  return s as unknown as net.Socket & { gone: boolean };
}

const limits = (o: Partial<PendingLimits>): PendingLimits => ({ max: 64, maxPerAddress: 16, maxProven: 64, graceMs: 0, ...o });
/** lets a sweep (a timer of graceMs) run */
const sweep = (ms = 5): Promise<void> => sleep(ms);

test('over the per-address cap the oldest connection that sent nothing good goes, not an older one TLS answered', async () => {
  const p = new PendingConnections(limits({ maxPerAddress: 3 }));
  const handshaking = fake('10.0.0.1'); // the oldest, but its ClientHello was good
  const a = fake('10.0.0.1');
  const b = fake('10.0.0.1');
  p.add(handshaking).answered();
  const ta = p.add(a);
  p.add(b);
  const newcomer = fake('10.0.0.1');
  const tn = p.add(newcomer);
  await sweep();
  assert.deepEqual([handshaking.gone, a.gone, b.gone, newcomer.gone], [false, true, false, false]);
  assert.equal(ta.evicted, true);
  assert.equal(tn.evicted, false);
  assert.equal(p.count, 3);
});

test('a connection that proved the key is never let go for a crowd of unproven ones from its own address', async () => {
  const p = new PendingConnections(limits({ maxPerAddress: 2 }));
  let released = 0;
  const source = p.add(fake('10.0.0.1'));
  source.proven(() => void released++);
  const crowd = Array.from({ length: 40 }, () => fake('10.0.0.1'));
  for (const s of crowd) p.add(s);
  await sweep();
  assert.equal(released, 0, 'the proven connection stays');
  assert.equal(source.evicted, false);
  assert.equal(p.proven, 1);
  assert.equal(crowd.filter((s) => !s.gone).length, 2, 'the crowd is held to its cap');
});

test('connections are judged only after their grace, unless the hard cap is passed: then the oldest goes at once', () => {
  const p = new PendingConnections(limits({ maxPerAddress: 2, graceMs: 60_000 }));
  const first = Array.from({ length: 8 }, () => fake('10.0.0.1'));
  for (const s of first) p.add(s);
  assert.equal(first.filter((s) => s.gone).length, 0, 'all eight are in their grace (4 x the cap is the hard one)');
  const ninth = fake('10.0.0.1');
  p.add(ninth);
  assert.deepEqual(
    first.map((s) => s.gone),
    [true, false, false, false, false, false, false, false],
    'past the hard cap, the oldest went at once',
  );
  assert.equal(ninth.gone, false);
  p.close();
});

test('over the overall cap the address holding the most gives one up; a lone source is never the one', async () => {
  const p = new PendingConnections(limits({ max: 4 }));
  const source = fake('10.0.0.9');
  p.add(source);
  const crowd = [fake('10.0.0.1'), fake('10.0.0.1'), fake('10.0.0.2')];
  for (const s of crowd) p.add(s);
  const next = fake('10.0.0.3');
  p.add(next);
  await sweep();
  assert.equal(source.gone, false, 'the lone connection stays');
  assert.deepEqual(
    crowd.map((s) => s.gone),
    [true, false, false],
    'the oldest of the busiest address went',
  );
  assert.equal(p.count, 4);
});

test('proven connections crowd out only each other: past their cap the oldest silent one is released', () => {
  const p = new PendingConnections(limits({ maxProven: 2 }));
  const released: number[] = [];
  for (let i = 0; i < 3; i++) p.add(fake('10.0.0.1')).proven(() => void released.push(i));
  assert.deepEqual(released, [0]);
  assert.equal(p.proven, 2);
});

test('settling counts once, also for a connection already evicted', async () => {
  const p = new PendingConnections(limits({ maxPerAddress: 2 }));
  const a = p.add(fake('10.0.0.1'));
  const b = fake('10.0.0.1');
  const tb = p.add(b);
  a.settle();
  a.settle();
  assert.equal(p.count, 1);
  p.add(fake('10.0.0.1'));
  p.add(fake('10.0.0.1')); // over the cap: b, the oldest, goes at the sweep
  await sweep();
  assert.equal(b.gone, true);
  tb.settle(); // its admission fails later and settles it again: no double count
  assert.equal(p.count, 2);
});
