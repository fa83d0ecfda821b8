/**
 * The reference guest's state (src/workload/state.ts): what a destination takes from the network,
 * field by field, and the beat interval a guest carries to its destination.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseGuestState, MAX_BEAT_MS, type GuestState } from '../src/workload/state.js';
import { SourceGuest } from '../src/workload/controller.js';

const good: GuestState = {
  version: 1,
  size: 1 << 20,
  content: 'mixed',
  seed: '1',
  pattern: 'uniform',
  span: 256,
  rate: 16,
  xs: '7',
  writes: '0',
  heartbeatSeq: 0,
  throttle: 0,
};
const parse = (o: object): GuestState => parseGuestState(Buffer.from(JSON.stringify(o)));

test('a state is taken field by field; a beat interval outside 1..MAX_BEAT_MS or not whole is refused', () => {
  assert.deepEqual(parse(good), good);
  assert.equal(parse({ ...good, beatMs: 10 }).beatMs, 10);
  assert.equal(parse({ ...good, beatMs: MAX_BEAT_MS }).beatMs, MAX_BEAT_MS);
  for (const beatMs of [0, -1, 1.5, MAX_BEAT_MS + 1, '10', null])
    assert.throws(() => parse({ ...good, beatMs }), { code: 'ERR_LIVEMIG_GUEST', message: /beatMs/ }, String(beatMs));
  assert.throws(() => parse({ ...good, span: 257 }), /span/);
  assert.throws(() => parse({ ...good, writes: '-1' }), /seed\/xs\/writes/);
});

test('a guest started with --beat-ms carries it in the state its destination takes; without it, none', async () => {
  for (const beatMs of [10, undefined]) {
    const guest = await SourceGuest.spawn({ size: 4 << 20, content: 'mixed', rate: 1, pattern: 'uniform', ...(beatMs ? { beatMs } : {}) });
    try {
      const s = await guest.state();
      assert.equal(s.beatMs, beatMs);
    } finally {
      guest.kill();
    }
  }
});
