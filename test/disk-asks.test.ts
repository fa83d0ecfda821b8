/**
 * The socket a VMM asks for disk blocks on in post-copy (native/postcopy/disk_waits.h): every
 * ask is hostile until checked, an overwrite claims whole blocks at once (no fetch, and the
 * block is not yet held: its source copy must still come), and a fetch still waiting when the
 * service ends fails with EIO rather than let the guest read what is not there. The same for a
 * guest's own accesses to an image marked for pre-content events.
 */
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, read, readSync, rmSync, truncateSync, write, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { precontentRefusal } from '../src/disk/probe.js';
import { watchImages } from '../src/disk/watch.js';
import { addon } from '../src/native.js';
import { FaultService } from '../src/postcopy/dest.js';
import { Region } from '../src/region/region.js';

const PAGE = 4096;
const MEMORY_PAGES = 16;
const DISK_PAGES = 32;
const FETCH = 1;
const OVERWRITE = 2;

function ask(fd: number, tag: bigint, disk: number, kind: number, offset: number, length: number): void {
  const m = Buffer.alloc(32);
  m.writeBigUInt64LE(tag, 0);
  m.writeUInt32LE(disk, 8);
  m.writeUInt32LE(kind, 12);
  m.writeBigUInt64LE(BigInt(offset), 16);
  m.writeBigUInt64LE(BigInt(length), 24);
  writeSync(fd, m);
}

/** the next answer: blocks until the service sends one */
function answer(fd: number): { tag: bigint; error: number } {
  const a = Buffer.alloc(64);
  const n = readSync(fd, a);
  assert.equal(n, 16, 'an answer is 16 bytes');
  return { tag: a.readBigUInt64LE(0), error: a.readInt32LE(8) };
}

test('asks for disk blocks: hostile ones refused by tag, an overwrite claims at once, a fetch left waiting fails with EIO', async () => {
  const region = Region.create((MEMORY_PAGES + DISK_PAGES) * PAGE, { name: 'disk-asks' });
  // a userfaultfd that never reports a fault: a pipe nobody writes to
  const [uffd, uffdWriter] = addon.socketPair();
  const [ours, theirs] = addon.socketPair(true);
  const needed = new Uint8Array(MEMORY_PAGES + DISK_PAGES).fill(1);
  const faults = new FaultService({
    region,
    uffd,
    guest: 0x7000_0000_0000n,
    needed,
    hashes: new BigUint64Array(MEMORY_PAGES + DISK_PAGES),
    version: 3,
    disks: { asks: ours, ranges: [{ firstPage: MEMORY_PAGES, pages: DISK_PAGES, dev: 0, ino: 0 }] },
  });
  faults.start();
  try {
    const bytes = DISK_PAGES * PAGE;
    ask(theirs, 1n, 0, 9, 0, PAGE);
    assert.deepEqual(answer(theirs), { tag: 1n, error: 22 }, 'an unknown kind: EINVAL');
    ask(theirs, 2n, 1, FETCH, 0, PAGE);
    assert.deepEqual(answer(theirs), { tag: 2n, error: 34 }, 'a disk the guest does not have: ERANGE');
    ask(theirs, 3n, 0, FETCH, bytes - PAGE, 2 * PAGE);
    assert.deepEqual(answer(theirs), { tag: 3n, error: 34 }, 'a range past the end: ERANGE');
    ask(theirs, 4n, 0, FETCH, 2 ** 53, 2 ** 53);
    assert.deepEqual(answer(theirs), { tag: 4n, error: 34 }, 'a range that wraps: ERANGE');
    ask(theirs, 5n, 0, FETCH, PAGE, 0);
    assert.deepEqual(answer(theirs), { tag: 5n, error: 34 }, 'an empty range: ERANGE');
    ask(theirs, 6n, 0, OVERWRITE, 512, PAGE);
    assert.deepEqual(answer(theirs), { tag: 6n, error: 22 }, 'an overwrite of part of a block: EINVAL');
    const short = Buffer.alloc(20);
    short.writeBigUInt64LE(7n, 0);
    writeSync(theirs, short);
    assert.deepEqual(answer(theirs), { tag: 7n, error: 71 }, 'a message of another size: EPROTO');

    ask(theirs, 8n, 0, OVERWRITE, 2 * PAGE, 2 * PAGE);
    assert.deepEqual(answer(theirs), { tag: 8n, error: 0 }, 'whole blocks claimed at once, with no connection to fetch over');
    assert.equal(faults.stats().disk_blocks_overwritten, 2);
    const held = faults.held();
    assert.equal(held[MEMORY_PAGES + 2], 0, 'a claimed block is not held: its source copy must still come');

    // a fetch of a claimed block goes on at once; of a missing one it waits
    ask(theirs, 9n, 0, FETCH, 2 * PAGE, PAGE);
    assert.deepEqual(answer(theirs), { tag: 9n, error: 0 });
    ask(theirs, 10n, 0, FETCH, 5 * PAGE, 100);
    await new Promise((r) => setTimeout(r, 50));
    const s = faults.stats();
    assert.equal(s.disk_fetches, 6, 'every fetch counted, refused or not');
    faults.stop();
    assert.deepEqual(answer(theirs), { tag: 10n, error: 5 }, 'the service ended before the block came: EIO');
  } finally {
    faults.stop();
    for (const fd of [ours, theirs, uffd, uffdWriter]) closeSync(fd);
    region.release();
  }
});

const precontent = precontentRefusal(tmpdir());
if (precontent) console.log(`# the pre-content case is skipped: ${precontent}`);

test(
  'a marked image: an access to blocks here goes on, a claimed block is written at once, a missing one fails with EIO when the service ends',
  { skip: precontent ?? false },
  async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-asks-'));
    const file = path.join(dir, 'disk0.img');
    writeFileSync(file, '');
    truncateSync(file, DISK_PAGES * PAGE);
    const disk = { name: 'disk0', size: DISK_PAGES * PAGE, path: file, fd: openSync(file, 'r+') };
    const watched = await watchImages([disk]);
    const region = Region.create(MEMORY_PAGES * PAGE, { name: 'disk-asks-marked' });
    const [uffd, uffdWriter] = addon.socketPair();
    const [ours, theirs] = addon.socketPair(true);
    // the disk's first 8 blocks are here, the rest must come (and the memory, which no guest
    // maps: a page held would be mapped into it)
    const needed = new Uint8Array(MEMORY_PAGES + DISK_PAGES).fill(1);
    needed.fill(0, MEMORY_PAGES, MEMORY_PAGES + 8);
    const pages = Region.adoptPieces([
      { fd: region.fd, offset: 0, size: region.size },
      { fd: watched.quiet[0]!, offset: 0, size: disk.size },
    ]);
    const faults = new FaultService({
      region: pages,
      uffd,
      guest: 0x7000_0000_0000n,
      needed,
      hashes: new BigUint64Array(MEMORY_PAGES + DISK_PAGES),
      version: 3,
      disks: { fanotify: watched.fanotify, asks: ours, ranges: watched.ranges(MEMORY_PAGES) },
    });
    faults.start();
    const guestFd = openSync(file, 'r+');
    try {
      const buf = Buffer.alloc(PAGE);
      assert.equal(await promisify(read)(guestFd, buf, 0, PAGE, 2 * PAGE).then((r) => r.bytesRead), PAGE, 'a block here reads at once');
      ask(theirs, 1n, 0, OVERWRITE, 20 * PAGE, PAGE);
      assert.deepEqual(answer(theirs), { tag: 1n, error: 0 });
      const written = await promisify(write)(guestFd, Buffer.alloc(PAGE, 7), 0, PAGE, 20 * PAGE);
      assert.equal(written.bytesWritten, PAGE, 'a claimed block is written with no fetch (there is no connection to fetch over)');
      let settled = false;
      const missing = promisify(read)(guestFd, Buffer.alloc(PAGE), 0, PAGE, 24 * PAGE).finally(() => (settled = true));
      missing.catch(() => undefined);
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(settled, false, 'a read of a missing block waits');
      faults.stop();
      await assert.rejects(missing, (e: NodeJS.ErrnoException) => e.code === 'EIO', 'the service ended before the block came: EIO, never stale content');
      assert.equal(faults.stats().disk_accesses_waited, 1);
    } finally {
      faults.stop();
      closeSync(guestFd);
      await watched.close();
      for (const fd of [ours, theirs, uffd, uffdWriter, disk.fd]) closeSync(fd);
      pages.release();
      region.release();
      rmSync(dir, { recursive: true, force: true });
    }
  },
);
