import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { test } from 'node:test';
import { guestAddon } from '../src/workload/guest-addon.js';
import { Region } from '../src/region/region.js';
import { fillContent, initialWriteState, verifyContent, type ContentName } from '../src/workload/content.js';

const checks: [ContentName, string][] = [
  ['mixed', 'de69b056c2b50d58f20d004fa12ef5553a33d31c6e391d68bea4942f5476f40d'],
  ['text', 'f2ed417208fbf3c775e786491036172d86a856c7eda5907e0facae3f9fa79af4'],
  ['dup', '5f195eea1545f4d5bd5872d857c78ded67e78b6f68bc3bac5da9868d8ca58202'],
];

for (const [content, sha] of checks) {
  test(`${content} content over 4096 pages matches docs/CONTENT.md's check value`, async () => {
    const r = Region.create(4096 * 4096);
    try {
      await fillContent(r, content, 1n);
      assert.equal(createHash('sha256').update(r.view()).digest('hex'), sha);
      if (content === 'text')
        assert.ok(r.view(0, 80).toString('latin1').startsWith('spell restaurant server plant change, require, food turn which. food four'));
    } finally {
      r.release();
    }
  });
}

test('the write model verifies a region after writes, and catches one wrong page', async () => {
  const r = Region.create(4096 * 512);
  try {
    await fillContent(r, 'mixed', 7n);
    const st = initialWriteState(7n);
    guestAddon.guestWrite(r.address, r.size, st, 5000, 512, false);
    assert.equal(st[1], 5000n);
    const model = { content: 'mixed' as const, seed: 7n, writes: 5000n, span: 512, sequential: false };
    assert.deepEqual(await verifyContent(r, model), { bad: 0, firstBad: -1 });
    assert.equal((await verifyContent(r, { ...model, writes: 4999n })).bad, 1, 'one write fewer: exactly the page of the last write differs');
    const p = r.page(100);
    p[5] = p[5]! ^ 1;
    assert.deepEqual(await verifyContent(r, model), { bad: 1, firstBad: 100 });
  } finally {
    r.release();
  }
});
