/**
 * The source's two ways to read a guest's pages (src/region/read-path.ts): through its own
 * populated mapping, or through the guest's files. Both give the same bytes; the mapping is
 * never read where the files hold no data (a read would allocate the hole); a file cut short
 * under the mapping fails the read cleanly. And the helpers that spread the work.
 */
import assert from 'node:assert/strict';
import { ftruncateSync } from 'node:fs';
import { test } from 'node:test';
import { addon } from '../src/native.js';
import { extentPages, splitExtents } from '../src/pages/extents.js';
import { chooseReadPath, readPathSample } from '../src/region/read-path.js';
import { Region } from '../src/region/region.js';

const PAGE = 4096;

/** Every page of `region` as the source's reads give it (native ReadPages, through samplePages). */
function readAll(region: Region): Buffer {
  const pages = Uint32Array.from({ length: region.pageCount }, (_, i) => i);
  const staging = Buffer.alloc(region.size, 0xee);
  addon.samplePages(region.nativeHandle, pages, staging);
  return staging;
}

test('through the mapping or the files, the same bytes; holes are read as zero and stay holes', async () => {
  const guest = Region.create(64 * PAGE, { name: 'read-path-guest' });
  try {
    for (const [p, v] of [
      [3, 7],
      [4, 9],
      [40, 1],
    ] as const)
      guest.page(p).fill(v);
    guest.page(41).writeUInt32LE(0xdeadbeef, 100); // data that is mostly zero: the zero check must not stop early
    const source = Region.adopt(guest.fd, guest.size);
    try {
      const data = await source.dataExtents();
      assert.deepEqual([...data], [3, 5, 40, 42]);
      await source.populateAsync(false, data);
      const viaFiles = readAll(source);
      addon.regionReadInPlace(source.nativeHandle, true);
      const viaMapping = readAll(source);
      assert.ok(viaMapping.equals(viaFiles), 'both paths read the same bytes');
      assert.ok(viaMapping.subarray(3 * PAGE, 4 * PAGE).equals(Buffer.alloc(PAGE, 7)));
      assert.equal(viaMapping.readUInt32LE(41 * PAGE + 100), 0xdeadbeef);
      assert.ok(viaMapping.subarray(10 * PAGE, 11 * PAGE).equals(Buffer.alloc(PAGE)), 'a hole reads as zero');
      assert.deepEqual([...(await source.dataExtents())], [3, 5, 40, 42], 'no hole was allocated by the reads');
      // a page the guest writes into a hole after the mapping was populated is read as written
      guest.page(20).fill(5);
      assert.ok(
        readAll(source)
          .subarray(20 * PAGE, 21 * PAGE)
          .equals(Buffer.alloc(PAGE, 5)),
      );
    } finally {
      source.release();
    }
  } finally {
    guest.release();
  }
});

test('a guest file cut short under the mapping fails the read with the cause, and the process lives', async () => {
  const guest = Region.create(64 * PAGE, { name: 'read-path-cut' });
  const source = Region.adopt(guest.fd, guest.size);
  try {
    guest.view().fill(3);
    await source.populateAsync(false, await source.dataExtents());
    addon.regionReadInPlace(source.nativeHandle, true);
    ftruncateSync(guest.fd, 16 * PAGE); // a hostile guest breaks the contract (docs/GUEST.md)
    const staging = Buffer.alloc(8 * PAGE);
    assert.throws(() => addon.samplePages(source.nativeHandle, Uint32Array.of(20, 21, 22, 23, 24, 25, 26, 27), staging), /ends before its pages/);
    addon.samplePages(source.nativeHandle, Uint32Array.of(0, 1, 2, 3, 4, 5, 6, 7), staging);
    assert.ok(staging.equals(Buffer.alloc(8 * PAGE, 3)), 'what is left of the file still reads');
  } finally {
    source.release();
    guest.release();
  }
});

test('the read path is timed on the guest, or taken as asked; too small a guest stays on the files', async () => {
  const guest = Region.create(8192 * PAGE, { name: 'read-path-choice' });
  try {
    guest.view().fill(1, 0, 4096 * PAGE);
    const data = await guest.dataExtents();
    await guest.populateAsync(false, data);
    const auto = await chooseReadPath(guest, data);
    assert.match(auto.path, /^(mapping|files)$/);
    assert.match(auto.reason, /through the mapping [\d.]+ us a page, through the files [\d.]+ us a page/);
    assert.deepEqual(await chooseReadPath(guest, data, 'files'), { path: 'files', reason: 'asked for' });
    const small = await chooseReadPath(guest, Float64Array.of(0, 100));
    assert.equal(small.path, 'files');
  } finally {
    guest.release();
  }
});

test('samples for timing: runs spread over the data, inside it, in order', () => {
  const extents = Float64Array.of(100, 2100, 5000, 9000);
  const sample = readPathSample(extents)!;
  assert.equal(sample.length, 128 * 32);
  const inside = (p: number): boolean => (p >= 100 && p < 2100) || (p >= 5000 && p < 9000);
  assert.ok(sample.every(inside), 'every sampled page holds data');
  for (let i = 1; i < sample.length; i++) assert.ok(sample[i]! > sample[i - 1]!, 'ascending, each page once');
  assert.ok(sample[0] === 100 && sample[sample.length - 1]! > 8000, 'from the first extent to the last');
  assert.equal(readPathSample(Float64Array.of(0, 4095)), undefined, 'fewer pages than a sample');
});

test('extents split for parallel work: every page once, in order, pieces aligned to huge pages', () => {
  const e = Float64Array.of(0, 1000, 2048, 10240, 20000, 20001);
  const parts = splitExtents(e, 3);
  assert.ok(parts.length <= 3);
  const all = parts.flatMap((p) => [...p]);
  let pages = 0;
  for (const p of parts) pages += extentPages(p);
  assert.equal(pages, extentPages(e));
  for (let i = 1; i < all.length; i++) assert.ok(all[i]! >= all[i - 1]!, 'in order');
  for (const p of parts.slice(0, -1)) assert.equal(extentPages(p) % 512, 0, 'each piece but the last is whole huge pages');
  assert.deepEqual(
    splitExtents(Float64Array.of(0, 10), 4).map((p) => [...p]),
    [[0, 10]],
  );
});
