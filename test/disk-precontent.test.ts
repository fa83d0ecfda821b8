/**
 * Disk post-copy's mechanism (src/disk/precontent.ts): an access to a block not yet at the
 * destination waits while it is fetched, then reads the source's content; a block is fetched
 * once; a guest write to a block that arrived is never overwritten by a push of the older
 * content; pushed blocks are not fetched again. The accesses come from another thread, as a
 * VMM's would, since each waits in the kernel until it is answered.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { addon } from '../src/native.js';
import { PrecontentImage } from '../src/disk/precontent.js';

const BS = 4096;
const BLOCKS = 64;

/** Why this host cannot watch a file for pre-content access, or undefined. */
function unsupported(): string | undefined {
  const dir = mkdtempSync(path.join(tmpdir(), 'livemig-pc-probe-'));
  const f = path.join(dir, 'probe');
  writeFileSync(f, '');
  try {
    addon.precontentUnwatch(addon.precontentWatch(f));
    return undefined;
  } catch (e) {
    return `fanotify pre-content events are not available here: ${(e as Error).message}`;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Runs `code` (CommonJS, with `file`, `fs` and `done(value)`) in a worker: its accesses wait in the kernel, not this thread. */
function inWorker<T>(file: string, code: string): Promise<T> {
  const w = new Worker(
    "const fs = require('node:fs'); const { workerData: file, parentPort } = require('node:worker_threads'); " +
      `const done = (v) => parentPort.postMessage(v); ${code}`,
    {
      eval: true,
      workerData: file,
    },
  );
  return new Promise((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
}

function setup(): { dir: string; file: string; source: Buffer; present: Uint8Array } {
  const dir = mkdtempSync(path.join(tmpdir(), 'livemig-pc-'));
  const file = path.join(dir, 'disk.img');
  const source = randomBytes(BLOCKS * BS);
  writeFileSync(file, '');
  truncateSync(file, BLOCKS * BS);
  // blocks 0-7 arrived before the guest started here
  const present = new Uint8Array(BLOCKS);
  const fd = openSync(file, 'r+');
  writeSync(fd, source, 0, 8 * BS, 0);
  closeSync(fd);
  present.fill(1, 0, 8);
  return { dir, file, source, present };
}

/** The image watched, its fetches from `source` counted in `fetched` (and failing while `fail(block)` says so). */
function watch(
  s: ReturnType<typeof setup>,
  o: { delayMs?: number; fail?: (block: number) => boolean; onError?: (e: unknown) => void } = {},
): Promise<{ img: PrecontentImage; fetched: number[] }> {
  const fetched: number[] = [];
  return PrecontentImage.start({
    path: s.file,
    size: BLOCKS * BS,
    blockSize: BS,
    present: s.present,
    fetch: async (first, count) => {
      for (let b = first; b < first + count; b++) if (o.fail?.(b)) throw new Error('the link broke');
      for (let b = first; b < first + count; b++) fetched.push(b);
      if (o.delayMs) await new Promise((r) => setTimeout(r, o.delayMs)); // the link
      return s.source.subarray(first * BS, (first + count) * BS);
    },
    ...(o.onError ? { onError: o.onError } : {}),
  }).then((img) => ({ img, fetched }));
}

const skip = unsupported();
if (skip) console.log(`# disk pre-content tests skipped: ${skip}`);

test('a read of blocks not yet here waits for them and returns the source content; each block is fetched once', { skip }, async () => {
  const s = setup();
  const { dir, file, source } = s;
  const { img, fetched: fetchedBlocks } = await watch(s, { delayMs: 2 });
  try {
    // a read across here and missing blocks, an unaligned one, then the whole image twice
    const got = await inWorker<{ a: Buffer; b: Buffer; all: Buffer; again: Buffer }>(
      file,
      `const fd = fs.openSync(file, 'r');
       const a = Buffer.alloc(3 * ${BS}); fs.readSync(fd, a, 0, a.length, 6 * ${BS});
       const b = Buffer.alloc(100); fs.readSync(fd, b, 0, 100, 30 * ${BS} + 4000);
       const all = fs.readFileSync(file); const again = fs.readFileSync(file);
       done({ a, b, all, again });`,
    );
    assert.ok(Buffer.from(got.a).equals(source.subarray(6 * BS, 9 * BS)), 'blocks 6-8: two were here, one fetched');
    assert.ok(Buffer.from(got.b).equals(source.subarray(30 * BS + 4000, 30 * BS + 4100)), 'a read across blocks 30 and 31');
    assert.ok(Buffer.from(got.all).equals(source), 'the whole image reads as the source');
    assert.ok(Buffer.from(got.again).equals(source));
    assert.deepEqual(
      [...fetchedBlocks].sort((x, y) => x - y),
      Array.from({ length: BLOCKS - 8 }, (_, i) => i + 8),
      'every missing block fetched once, none that was here',
    );
    assert.equal(img.missing, 0);
    await img.stop();
    // the watch is gone: the file reads with nobody left to answer
    assert.ok(readFileSync(file).equals(source));
  } finally {
    await img.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a guest write to a block that arrived is never overwritten by a push; a pushed block is not fetched again', { skip }, async () => {
  const s = setup();
  const { dir, file, source } = s;
  const { img, fetched: fetchedBlocks } = await watch(s);
  try {
    const mine = Buffer.alloc(BS, 0x77);
    // the guest reads block 20 (fetched), then writes all of it
    await inWorker(
      file,
      `const fd = fs.openSync(file, 'r+'); fs.readSync(fd, Buffer.alloc(${BS}), 0, ${BS}, 20 * ${BS}); ` +
        `fs.writeSync(fd, Buffer.alloc(${BS}, 0x77), 0, ${BS}, 20 * ${BS}); done(0);`,
    );
    // the push of block 20's older content comes after: it must not land
    await img.push(20, source.subarray(20 * BS, 21 * BS));
    // block 40 pushed first: a read then fetches nothing
    await img.push(40, source.subarray(40 * BS, 41 * BS));
    const got = await inWorker<{ b20: Buffer; b40: Buffer }>(
      file,
      `const fd = fs.openSync(file, 'r'); const b20 = Buffer.alloc(${BS}), b40 = Buffer.alloc(${BS});
       fs.readSync(fd, b20, 0, ${BS}, 20 * ${BS}); fs.readSync(fd, b40, 0, ${BS}, 40 * ${BS}); done({ b20, b40 });`,
    );
    assert.ok(Buffer.from(got.b20).equals(mine), "the guest's write stands");
    assert.ok(Buffer.from(got.b40).equals(source.subarray(40 * BS, 41 * BS)), 'the pushed block reads as the source');
    assert.ok(fetchedBlocks.includes(20), 'block 20 was fetched for the read');
    assert.ok(!fetchedBlocks.includes(40), 'block 40 came by push, not by fetch');
  } finally {
    await img.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a fetch that fails fails the access with EIO, and the next access tries again', { skip }, async () => {
  const s = setup();
  const { dir, file, source } = s;
  let fail = true;
  const errors: unknown[] = [];
  const { img } = await watch(s, { fail: (b) => fail && b === 50, onError: (e) => errors.push(e) });
  try {
    const first = await inWorker<string>(
      file,
      `const fd = fs.openSync(file, 'r'); try { fs.readSync(fd, Buffer.alloc(${BS}), 0, ${BS}, 50 * ${BS}); done('read'); } catch (e) { done(e.code); }`,
    );
    assert.equal(first, 'EIO');
    assert.match(String(errors[0]), /the link broke/);
    fail = false;
    const got = await inWorker<Buffer>(
      file,
      `const fd = fs.openSync(file, 'r'); const b = Buffer.alloc(${BS}); fs.readSync(fd, b, 0, ${BS}, 50 * ${BS}); done(b);`,
    );
    assert.ok(Buffer.from(got).equals(source.subarray(50 * BS, 51 * BS)));
  } finally {
    await img.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
