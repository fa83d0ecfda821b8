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
import { CHANNEL_NAMES } from '../src/trace.js';
import { ReceiverEvent, SourceEvent } from '../src/trace-events.js';

test('a migration publishes its hand-over steps on livemig:source and livemig:receiver, and the encoder its rounds on livemig:chooser', async () => {
  const seen: { channel: string; event: string; ms: number; data: Record<string, unknown> }[] = [];
  const subs = [CHANNEL_NAMES.source, CHANNEL_NAMES.receiver, CHANNEL_NAMES.chooser].map((name) => {
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
  const source = seen.filter((s) => s.channel === CHANNEL_NAMES.source).map((s) => s.event);
  const order = [SourceEvent.pauseRequested, SourceEvent.guestPaused, SourceEvent.finalCollectDone, SourceEvent.lastPagesSent, SourceEvent.activatedReceived];
  const at = order.map((e) => source.indexOf(e));
  assert.ok(at.every((i) => i >= 0), `every step published: ${source.join(', ')}`);
  assert.deepEqual([...at].sort((a, b) => a - b), at, 'in order');
  const commit = seen.find((s) => s.event === SourceEvent.commitSent);
  assert.equal(typeof commit?.data['pages'], 'number', 'a step carries its figures as fields');
  assert.ok(seen.some((s) => s.channel === CHANNEL_NAMES.receiver && s.event === ReceiverEvent.guestActivated), 'the receiver publishes its own steps');
  const rounds = seen.filter((s) => s.channel === CHANNEL_NAMES.chooser);
  const accounted = rounds.every((r) => typeof r.data['round'] === 'number' && typeof r.data['raw_pages'] === 'number');
  assert.ok(rounds.length > 0 && accounted, 'the encoder publishes per-round accounting');
});
