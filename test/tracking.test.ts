import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { addon } from '../src/native.js';
import { Region } from '../src/region/region.js';
import { ExternalTracker, HashTracker, UffdAsyncTracker, bitmapToPages, chooseTracker, probe } from '../src/tracking/index.js';

const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const softDirty = probe().find((p) => p.backend === 'soft-dirty')!;

async function rejectsWith(p: Promise<unknown>, code: string, message: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => {
    assert.ok(e instanceof LivemigError, String(e));
    assert.equal(e.code, code);
    assert.match(e.message, message);
    return true;
  });
}

test('probe reports every backend with a reason', () => {
  const p = probe();
  assert.deepEqual(
    p.map((x) => x.backend),
    ['uffd-async', 'soft-dirty', 'hash', 'external'],
  );
  for (const x of p) assert.ok(x.reason.length > 10, `${x.backend} has a reason`);
  const sd = p.find((x) => x.backend === 'soft-dirty')!;
  if (!sd.available) assert.match(sd.reason, /CONFIG_MEM_SOFT_DIRTY|failed with/);
});

test('automatic choice takes the best working backend and says why', () => {
  const r = Region.create(4096 * 4);
  try {
    const c = chooseTracker(r);
    assert.equal(c.backend, uffd.available ? 'uffd-async' : softDirty.available ? 'soft-dirty' : 'hash');
    assert.ok(c.reason.length > 0);
    if (!softDirty.available) {
      assert.throws(
        () => chooseTracker(r, { backend: 'soft-dirty' }),
        (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_UNSUPPORTED' && /soft-dirty is not available here/.test(e.message),
      );
    }
    assert.equal(chooseTracker(r, { backend: 'external' }).backend, 'external');
  } finally {
    r.release();
  }
});

test('trackers enforce their lifecycle', async () => {
  const r = Region.create(4096 * 64);
  try {
    const t = new HashTracker(r);
    await rejectsWith(t.collect(), 'ERR_LIVEMIG_STATE', /collect\(\) called while idle/);
    await t.start();
    await rejectsWith(t.start(), 'ERR_LIVEMIG_STATE', /start\(\) called while tracking/);
    const first = t.collect();
    await rejectsWith(t.collect(), 'ERR_LIVEMIG_STATE', /another collect\(\) is running/);
    await first;
    await t.stop();
    await t.stop();
    await rejectsWith(t.collect(), 'ERR_LIVEMIG_RELEASED', /collect\(\) called while stopped/);
  } finally {
    r.release();
  }
});

test(
  'uffd-async: pages written before start() are not reported; stop() waits for a collect in flight',
  { skip: uffd.available ? false : uffd.reason },
  async () => {
    const r = Region.create(4096 * 256);
    try {
      r.view().fill(1);
      const t = new UffdAsyncTracker(r);
      await t.start();
      assert.equal((await t.collect()).length, 0);
      r.page(255)[0] = 2;
      r.page(0)[0] = 2;
      assert.deepEqual(Array.from(t.collectSync()), [0, 255]);
      const pending = t.collect();
      await t.stop();
      assert.equal((await pending).length, 0);
    } finally {
      r.release();
    }
  },
);

test('uffd-async: a last collect without re-arming leaves its pages reported again, never lost', { skip: uffd.available ? false : uffd.reason }, async () => {
  const r = Region.create(4096 * 64);
  try {
    r.view().fill(1);
    const t = new UffdAsyncTracker(r);
    await t.start();
    r.page(3)[0] = 2;
    assert.deepEqual(Array.from(t.collectSync()), [3], 'a re-arming collect');
    assert.deepEqual(Array.from(t.collectSync()), [], 'reported once, then protected again');
    r.page(7)[0] = 2;
    assert.deepEqual(Array.from(t.collectSync({ rearm: false })), [7]);
    r.page(9)[0] = 2;
    assert.deepEqual(Array.from(t.collectSync({ rearm: false })), [7, 9], 'page 7 stayed writable: reported again with the new write');
    assert.deepEqual(Array.from(await t.collect()), [7, 9]);
    assert.deepEqual(Array.from(t.collectSync()), [], 'the re-arming collect protected them again');
    await t.stop();
  } finally {
    r.release();
  }
});

test('uffd-async: collecting from a released region is a clear error, not a crash', { skip: uffd.available ? false : uffd.reason }, async () => {
  const r = Region.create(4096 * 16);
  const t = new UffdAsyncTracker(r);
  await t.start();
  r.release();
  await assert.rejects(t.collect(), (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_TRACKING' && /released/.test(e.message));
  await t.stop();
});

test('external tracker: lists, bitmaps, offsets and bad reports', async () => {
  const t = new ExternalTracker({ pageCount: 100 });
  await t.start();
  t.markDirty([3, 1, 3]);
  t.markDirty(Uint32Array.of(99));
  t.markDirty(Uint8Array.of(0b1000_0001), 8); // pages 8 and 15
  t.markDirty(Uint8Array.of(0b11), 21); // unaligned: pages 21 and 22
  t.markDirty(BigUint64Array.of(1n << 40n)); // page 40
  assert.deepEqual(Array.from(await t.collect()), [1, 3, 8, 15, 21, 22, 40, 99]);
  assert.equal((await t.collect()).length, 0);
  assert.throws(() => t.markDirty([100]), /page index 100 \(\+0\) is outside 0\.\.99/);
  assert.throws(() => t.markDirty([1.5]), /page index 1.5/);
  assert.throws(() => t.markDirty(Uint8Array.of(1), 100), /firstPage must be an integer in 0\.\.99/);
  assert.throws(() => t.markDirty(new Uint8Array(14).fill(0xff)), /beyond the region's 100 pages/);
  assert.throws(() => t.markDirty('5' as unknown as number[]), /markDirty expects a bitmap/);
  await t.stop();
});

test('bitmapToPages ignores padding bits past the page count', () => {
  assert.deepEqual(Array.from(bitmapToPages(Uint8Array.of(0xff, 0xff), 10)), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
});

test('hash tracking: a page sent half-written, then written back, is caught by the final collect against what was sent', async () => {
  const r = Region.create(8 * 4096, { name: 'hash-aba' });
  try {
    const t = new HashTracker(r);
    const page = (): Buffer => Buffer.from(r.page(3).buffer, r.page(3).byteOffset, 4096);
    page().fill(1); // the content the rounds saw
    await t.start();
    page()[0] = 2;
    assert.deepEqual(Array.from(await t.collect()), [3]);
    // sent while a write was half done (a lock taken): the destination holds this
    page()[100] = 9;
    const sent = new BigUint64Array(r.pageCount).fill(addon.zeroPageHash());
    for (let p = 0; p < r.pageCount; p++) sent[p] = addon.pageHash(Buffer.from(r.page(p).buffer, r.page(p).byteOffset, 4096));
    // written back (the lock released): as the last collect saw it
    page()[100] = 1;
    assert.deepEqual(Array.from(await t.collectFinal(sent)), [3], 'the page differs from what the destination holds');
    await t.stop();
  } finally {
    r.release();
  }
});
