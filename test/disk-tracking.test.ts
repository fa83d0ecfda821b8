/**
 * Disk write tracking (src/disk/tracking.ts, issue 33 item 2): each backend loses no write
 * under a concurrent writer. A worker writes stamped blocks into the image as fast as it can and
 * logs each completed write; every write logged before a collect began must be in that collect's
 * answer or an earlier one, a collect with no write since answers nothing, and the frozen copy a
 * reflink collect leaves is the image as it was. reflink runs on XFS and btrfs made on loop
 * files (skipped, with the reason, where this host cannot make them).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { probeDisk } from '../src/disk/probe.js';
import { changedBlocks, chooseBlockTracker, HashBlockTracker, ReflinkBlockTracker, type BlockTracker, type DiskImage } from '../src/disk/tracking.js';

const BLOCK = 4096;
const BLOCKS = 16384; // 64 MiB
const LOG = 1 << 20; // writes the log can hold

/** Writes stamped blocks at random until told to stop; log[0] counts completed writes, log[1+i] is the i-th one's block. */
const WRITER = `
const { workerData } = require('node:worker_threads');
const fs = require('node:fs');
const { file, blocks, log, stop } = workerData;
const fd = fs.openSync(file, 'r+');
const buf = Buffer.alloc(${BLOCK});
let seed = 12345, gen = 0;
while (Atomics.load(stop, 0) === 0 && Atomics.load(log, 0) < log.length - 1) {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  const b = seed % blocks;
  buf.writeUInt32LE(b, 0);
  buf.writeUInt32LE(++gen, 4);
  buf.fill(gen & 0xff, 8);
  fs.writeSync(fd, buf, 0, buf.length, b * ${BLOCK});
  const n = Atomics.load(log, 0);
  log[1 + n] = b;
  Atomics.store(log, 0, n + 1);
}
fs.closeSync(fd);
`;

function makeImage(dir: string): DiskImage {
  const file = path.join(dir, 'disk.img');
  const fd = openSync(file, 'w+');
  // data in the first 8 MiB and a run in the middle, holes elsewhere
  const data = Buffer.alloc(1 << 20, 0x5a);
  for (let i = 0; i < 8; i++) writeSync(fd, data, 0, data.length, i * data.length);
  writeSync(fd, data, 0, data.length, 40 << 20);
  writeSync(fd, Buffer.alloc(1), 0, 1, BLOCKS * BLOCK - 1);
  return { fd, path: file, size: BLOCKS * BLOCK, blockSize: BLOCK };
}

async function noWriteLost(tracker: BlockTracker, disk: DiskImage): Promise<void> {
  const log = new Int32Array(new SharedArrayBuffer(4 * LOG));
  const stop = new Int32Array(new SharedArrayBuffer(4));
  await tracker.arm();
  const seen = new Uint8Array(BLOCKS);
  const worker = new Worker(WRITER, { eval: true, workerData: { file: disk.path, blocks: BLOCKS, log, stop } });
  try {
    let checked = 0;
    // rounds while the writer runs: each after it completed more writes
    for (let round = 0; round < 12; round++) {
      const from = Atomics.load(log, 0);
      for (let waited = 0; Atomics.load(log, 0) < from + 50 && waited < 5000; waited += 2) await new Promise((r) => setTimeout(r, 2));
      const before = Atomics.load(log, 0);
      const dirty = await tracker.collect();
      for (let i = 0; i < dirty.length; i += 2) seen.fill(1, dirty[i]!, dirty[i + 1]!);
      for (; checked < before; checked++) assert.equal(seen[log[1 + checked]!], 1, `round ${round}: write ${checked} to block ${log[1 + checked]} was missed`);
    }
    assert.ok(checked > 100, `the writer wrote ${checked} blocks while the tracker collected`);
  } finally {
    Atomics.store(stop, 0, 1);
    await new Promise((r) => worker.once('exit', r));
  }
  const last = await tracker.collect();
  for (let i = 0; i < last.length; i += 2) seen.fill(1, last[i]!, last[i + 1]!);
  const total = Atomics.load(log, 0);
  for (let k = 0; k < total; k++) assert.equal(seen[log[1 + k]!], 1, `write ${k} to block ${log[1 + k]} was missed`);
  // nothing written since: nothing to say (a tracker that answers everything fails here)
  assert.deepEqual([...(await tracker.collect())], []);
  // what the tracker offers to read from is the image as of the last collect
  const a = Buffer.alloc(1 << 20);
  const b = Buffer.alloc(1 << 20);
  for (let at = 0; at < disk.size; at += a.length) {
    readSync(disk.fd, a, 0, a.length, at);
    readSync(tracker.readFd(), b, 0, b.length, at);
    assert.ok(a.equals(b), `the frozen copy differs from the image at ${at}`);
  }
  // the pause's collect: writes made since the last collect, told without one (reflink: no clone)
  const written = [3, 4, 900, 16383];
  for (const b of written) writeSync(disk.fd, Buffer.alloc(BLOCK, b & 0xff), 0, BLOCK, b * BLOCK);
  const final = await tracker.collectFinal();
  const inFinal = new Uint8Array(BLOCKS);
  for (let i = 0; i < final.length; i += 2) inFinal.fill(1, final[i]!, final[i + 1]!);
  for (const b of written) assert.equal(inFinal[b], 1, `the final collect missed block ${b}`);
}

test('hash: no write lost under a concurrent writer, nothing reported when nothing was written', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'livemig-disk-'));
  const disk = makeImage(dir);
  const t = new HashBlockTracker(disk);
  try {
    await noWriteLost(t, disk);
  } finally {
    t.close();
    closeSync(disk.fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

/** A filesystem of `kind` on a loop file, mounted for fn; the reason it cannot be, or undefined. */
function fsReason(kind: 'xfs' | 'btrfs'): string | undefined {
  if (process.getuid?.() !== 0) return `making a ${kind} filesystem on a loop device needs root`;
  try {
    execFileSync('sh', ['-c', `command -v mkfs.${kind} && command -v losetup`], { stdio: 'ignore' });
  } catch {
    return `mkfs.${kind} or losetup is not installed (.ci/run installs ${kind === 'xfs' ? 'xfsprogs' : 'btrfs-progs'})`;
  }
  return undefined;
}

async function onLoopFs(kind: 'xfs' | 'btrfs', fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(path.join(tmpdir(), `livemig-${kind}-`));
  const backing = path.join(dir, 'fs.img');
  const mnt = path.join(dir, 'mnt');
  execFileSync('truncate', ['-s', '512M', backing]);
  execFileSync(`mkfs.${kind}`, kind === 'xfs' ? ['-q', '-m', 'reflink=1', backing] : ['-q', backing]);
  execFileSync('mkdir', [mnt]);
  execFileSync('mount', ['-o', 'loop', backing, mnt]);
  try {
    await fn(mnt);
  } finally {
    execFileSync('umount', [mnt]);
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('reflink', () => {
  for (const kind of ['xfs', 'btrfs'] as const) {
    const skip = fsReason(kind);
    if (skip) console.log(`# reflink on ${kind} skipped: ${skip}`);
    test(`${kind}: chosen there, no write lost under a concurrent writer, its clone is the image as collected`, { skip }, async () => {
      await onLoopFs(kind, async (mnt) => {
        const disk = makeImage(mnt);
        let t: BlockTracker | undefined;
        try {
          t = await chooseBlockTracker(disk);
          assert.equal(t.backend, 'reflink', t.reason);
          const features = await probeDisk(mnt);
          assert.deepEqual(
            features.map((f) => [f.feature, f.available]),
            [
              ['reflink', true],
              ['extents', true],
              ['precontent', features[2]!.available],
            ],
            'livemig probe says what the chooser found',
          );
          assert.ok(t instanceof ReflinkBlockTracker);
          await noWriteLost(t, disk);
        } finally {
          t?.close();
          closeSync(disk.fd);
        }
      });
    });
  }

  test('where the filesystem does not clone, hash is chosen and says why', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-disk-'));
    const disk = makeImage(dir);
    try {
      const t = await chooseBlockTracker(disk);
      // this test's directory is on the host's root filesystem; if that clones, there is nothing to see here
      if (t.backend === 'reflink') return;
      assert.equal(t.backend, 'hash');
      assert.match(t.reason, /cannot be cloned here \(.+\)/);
    } finally {
      closeSync(disk.fd);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test('changed blocks from two clones’ extents: moved, appeared, gone, unwritten; a block is dirty if any byte is', () => {
  const e = (...xs: number[]): Float64Array => Float64Array.from(xs);
  const size = 64 * BLOCK;
  // one extent before; after, block 3 moved (copied on write) and blocks 10-11 appeared
  const before = e(0, 1000 * BLOCK, 8 * BLOCK, 0);
  const after = e(
    0,
    1000 * BLOCK,
    3 * BLOCK,
    0,
    3 * BLOCK,
    5000 * BLOCK,
    BLOCK,
    0,
    4 * BLOCK,
    1004 * BLOCK,
    4 * BLOCK,
    0,
    10 * BLOCK,
    7000 * BLOCK,
    2 * BLOCK,
    0,
  );
  assert.deepEqual([...changedBlocks(before, after, BLOCK, size)], [3, 4, 10, 12]);
  // gone (a discard punched it) and an unwritten extent written in place
  assert.deepEqual([...changedBlocks(e(0, 100, 2 * BLOCK, 0), e(0, 100, BLOCK, 0), BLOCK, size)], [1, 2]);
  assert.deepEqual([...changedBlocks(e(0, 100, BLOCK, 0x800), e(0, 100, BLOCK, 0), BLOCK, size)], [0, 1]);
  // an extent boundary inside a block makes the whole block dirty; the same extents, nothing
  assert.deepEqual([...changedBlocks(e(0, 100, 6000, 0), e(0, 100, 5000, 0), BLOCK, size)], [1, 2]);
  assert.deepEqual([...changedBlocks(before, before, BLOCK, size)], []);
});

test('livemig probe on a directory it cannot write says so for every disk feature', async () => {
  const features = await probeDisk('/proc/livemig-no-such-dir');
  assert.equal(features.length, 3);
  for (const f of features) {
    assert.equal(f.available, false);
    assert.match(f.reason, /cannot make a scratch file in \/proc\/livemig-no-such-dir/);
  }
});

test('a disk is checked before anything is tracked', () => {
  const base = { fd: 0, path: '/dev/null', size: 1 << 20 };
  assert.throws(() => new HashBlockTracker({ ...base, blockSize: 512 }), /power of two from 4096 to 1 MiB/);
  assert.throws(() => new HashBlockTracker({ ...base, blockSize: 12288 }), /power of two/);
  assert.throws(() => new ReflinkBlockTracker({ ...base, size: -1, blockSize: 4096 }), /size must be a positive integer/);
});
