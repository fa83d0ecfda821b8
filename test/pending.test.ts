/**
 * The listener's pending connections (src/receiver/pending.ts): capped per address and
 * overall; at a cap the newcomer stays and the oldest silent connection of the crowded
 * address goes.
 */
import assert from 'node:assert/strict';
import type net from 'node:net';
import { test } from 'node:test';
import { PendingConnections } from '../src/receiver/pending.js';

/** A socket as the table sees it: an address, the bytes it sent, whether it was destroyed. */
function fake(remoteAddress: string, bytesRead = 0): net.Socket & { gone: boolean } {
  const s = { remoteAddress, bytesRead, gone: false, destroy() {
    s.gone = true;
    s.remoteAddress = undefined as unknown as string; // as a destroyed socket: it no longer says
  } };
  return s as unknown as net.Socket & { gone: boolean };
}

test('at the per-address cap the newcomer stays and the oldest silent one of that address goes, even behind one that sent bytes', () => {
  const p = new PendingConnections(64, 3);
  const talking = fake('10.0.0.1', 12); // the oldest, but it has sent part of its first frame
  const a = fake('10.0.0.1');
  const b = fake('10.0.0.1');
  for (const s of [talking, a, b]) p.add(s);
  const newcomer = fake('10.0.0.1');
  p.add(newcomer);
  assert.deepEqual([talking.gone, a.gone, b.gone, newcomer.gone], [false, true, false, false]);
  assert.equal(p.wasEvicted(a), true);
  assert.equal(p.wasEvicted(newcomer), false);
  assert.equal(p.count, 3);
});

test('at the overall cap the address holding the most gives one up; a lone source is never the one', () => {
  const p = new PendingConnections(4, 16);
  const source = fake('10.0.0.9');
  p.add(source);
  const crowd = [fake('10.0.0.1'), fake('10.0.0.1'), fake('10.0.0.2')];
  for (const s of crowd) p.add(s);
  const next = fake('10.0.0.3');
  p.add(next);
  assert.equal(source.gone, false, 'the lone connection stays');
  assert.deepEqual(crowd.map((s) => s.gone), [true, false, false], 'the oldest of the busiest address went');
  assert.equal(p.count, 4);
});

test('settling counts once, also for a socket already destroyed or evicted', () => {
  const p = new PendingConnections(2, 2);
  const a = fake('10.0.0.1');
  const b = fake('10.0.0.1');
  p.add(a);
  p.add(b);
  a.destroy(); // its address is gone from the socket: the table kept it
  p.settle(a);
  p.settle(a);
  assert.equal(p.count, 1);
  p.add(fake('10.0.0.1'));
  p.add(fake('10.0.0.1')); // evicts b
  assert.equal(b.gone, true);
  p.settle(b); // its admission fails later and settles it again: no double count
  assert.equal(p.count, 2);
});
