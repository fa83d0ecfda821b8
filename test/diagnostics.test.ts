/**
 * Observers subscribe to named diagnostics channels (src/trace.ts): a migration publishes its
 * steps on livemig:source and livemig:receiver as structured messages, in order.
 */
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { test } from 'node:test';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { migrate } from '../src/source/migrate.js';

test('a migration publishes its hand-over steps on livemig:source and livemig:receiver, and the encoder its rounds on livemig:chooser', async () => {
  const seen: { channel: string; event: string; ms: number; data: Record<string, unknown> }[] = [];
  const subs = ['livemig:source', 'livemig:receiver', 'livemig:chooser'].map((name) => {
    const fn = (m: unknown): void => {
      const { event, ms, ...data } = m as { event: string; ms: number };
      seen.push({ channel: name, event, ms, data });
    };
    diagnostics_channel.subscribe(name, fn);
    return () => diagnostics_channel.unsubscribe(name, fn);
  });
  const region = Region.create(256 * 4096, { name: 'diag-src' });
  region.view().fill(3);
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined });
  try {
    const report = await migrate({ region, to: { host: '127.0.0.1', port: rx.port }, pause: async () => new Uint8Array(4), resume: async () => undefined });
    await rx.next();
    assert.equal(report.verified, true);
  } finally {
    for (const off of subs) off();
    await rx.close();
    region.release();
  }
  const source = seen.filter((s) => s.channel === 'livemig:source').map((s) => s.event);
  const order = ['pause requested', 'guest paused', 'final collect done', 'last pages sent', 'ACTIVATED received'];
  const at = order.map((e) => source.indexOf(e));
  assert.ok(at.every((i) => i >= 0), `every step published: ${source.join(', ')}`);
  assert.deepEqual([...at].sort((a, b) => a - b), at, 'in order');
  const commit = seen.find((s) => s.event === 'last pages, device state and COMMIT sent');
  assert.equal(typeof commit?.data['pages'], 'number', 'a step carries its figures as fields');
  assert.ok(seen.some((s) => s.channel === 'livemig:receiver' && s.event === 'guest activated'), 'the receiver publishes its own steps');
  const rounds = seen.filter((s) => s.channel === 'livemig:chooser');
  assert.ok(rounds.length > 0 && rounds.every((r) => typeof r.data['round'] === 'number' && typeof r.data['raw_pages'] === 'number'), 'the encoder publishes per-round accounting');
});
