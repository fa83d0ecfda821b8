/**
 * A guest's disk moves with its memory (issue 33, pre-copy): the image arrives bit-identical
 * while a writer keeps writing it until the pause, its holes are neither sent nor allocated at
 * the destination, the writes the VMM flushed before the pause are on the destination's disk,
 * and a destination that takes no disks refuses before reserving anything. On the host's own
 * filesystem (the hash tracker) and on XFS made on a loop file (reflink), where it can be made.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  fdatasyncSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { takeKeptImages } from '../src/disk/kept.js';
import { precontentRefusal } from '../src/disk/probe.js';
import type { IncomingGuest } from '../src/guest/incoming-session.js';
import { HeartbeatObserver, SourceGuest, startReferenceIncoming } from '../src/workload/controller.js';
import { cuttableProxy, guestCheck } from './helpers.js';
import { runDemo } from '../src/demo/demo.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { migrate } from '../src/source/migrate.js';
import { decodeHello } from '../src/protocol/messages.js';
import { pack } from 'msgpackr';

const MiB = 1 << 20;
const DISK = 32 * MiB;

const WRITER = `
const { workerData } = require('node:worker_threads');
const fs = require('node:fs');
const { file, stop, count } = workerData;
const fd = fs.openSync(file, 'r+');
const buf = Buffer.alloc(4096);
let seed = 99;
while (Atomics.load(stop, 0) === 0) {
  seed = (seed * 1103515245 + 12345) % 2147483648;
  const block = seed % ${DISK / 4096};
  buf.fill(seed & 0xff);
  buf.writeUInt32LE(block, 0);
  fs.writeSync(fd, buf, 0, 4096, block * 4096);
  Atomics.add(count, 0, 1);
}
fs.fdatasyncSync(fd);
fs.closeSync(fd);
`;

function makeDisk(dir: string): { file: string; fd: number } {
  const file = path.join(dir, 'source-disk.img');
  const fd = openSync(file, 'w+');
  const data = Buffer.alloc(MiB);
  for (let i = 0; i < 4; i++) writeSync(fd, data.fill(i + 1), 0, MiB, i * MiB);
  writeSync(fd, data.fill(9), 0, MiB, 20 * MiB);
  writeSync(fd, Buffer.alloc(1), 0, 1, DISK - 1);
  fdatasyncSync(fd);
  return { file, fd };
}

async function migrateWithDisk(sourceDir: string, destDir: string): Promise<void> {
  const memory = Region.create(16 * MiB, { name: 'disk-migrate' });
  memory.view().fill(0x3c, 0, 8 * MiB);
  const disk = makeDisk(sourceDir);
  const stop = new Int32Array(new SharedArrayBuffer(4));
  const count = new Int32Array(new SharedArrayBuffer(4));
  // the guest writes its disk from before the migration until its pause
  const writer = new Worker(WRITER, { eval: true, workerData: { file: disk.file, stop, count } });
  const writerDone: Promise<unknown> = new Promise((r) => writer.once('exit', r));
  while (Atomics.load(count, 0) < 100) await new Promise((r) => setTimeout(r, 2));
  let memoryGot: Buffer | undefined;
  let reservedDisks: { name: string; path: string }[] = [];
  const rx = await listen('127.0.0.1', 0, {
    disks: { dir: destDir },
    onReserved: (_r, _p, _l, m) => void (reservedDisks = m.disks ?? []),
    activate: async (region) => void (memoryGot = Buffer.from(region.view())),
  });
  try {
    const report = await migrate({
      region: memory,
      to: { host: '127.0.0.1', port: rx.port },
      disks: [{ name: 'root', fd: disk.fd, path: disk.file, size: DISK }],
      // the pause stops the writer, which flushes (as a VMM drains its I/O)
      pause: async () => {
        Atomics.store(stop, 0, 1);
        await writerDone;
        return new Uint8Array(0);
      },
      resume: async () => undefined,
    });
    await rx.next();
    assert.equal(report.verified, true);
    assert.ok(memoryGot?.equals(memory.view()), 'the memory arrived');
    assert.deepEqual(
      reservedDisks.map((d) => d.name),
      ['root'],
    );
    const dest = path.join(destDir, 'root.img');
    assert.equal(reservedDisks[0]!.path, dest);
    assert.ok(Atomics.load(count, 0) > 100, 'the guest wrote its disk during the migration');
    assert.ok(readFileSync(dest).equals(readFileSync(disk.file)), 'the destination disk is the source disk, every flushed write in it');
    // holes stay holes: the image holds ~5 MiB of data and what the writer touched, not 32
    assert.ok(statSync(dest).blocks * 512 < DISK / 2, `the destination image allocated ${statSync(dest).blocks * 512} bytes`);
    assert.ok(report.hole_pages > 0, 'the disk holes were counted, not sent');
    assert.match(report.tracker_reason, /disk root: (reflink|hash)/);
  } finally {
    Atomics.store(stop, 0, 1);
    await writerDone;
    await rx.close();
    closeSync(disk.fd);
    memory.release();
  }
}

describe('a guest with a disk', () => {
  test('moves with its memory: the disk arrives bit-identical, holes stay holes (hash tracking here)', async () => {
    const src = mkdtempSync(path.join(tmpdir(), 'livemig-dsrc-'));
    const dst = mkdtempSync(path.join(tmpdir(), 'livemig-ddst-'));
    try {
      await migrateWithDisk(src, dst);
    } finally {
      rmSync(src, { recursive: true, force: true });
      rmSync(dst, { recursive: true, force: true });
    }
  });

  const noXfs = process.getuid?.() !== 0 ? 'needs root for a loop mount' : hasMkfsXfs() ? undefined : 'mkfs.xfs is not installed (.ci/run installs xfsprogs)';
  test('on XFS, tracked by clones: the same', { skip: noXfs }, async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-dxfs-'));
    const backing = path.join(dir, 'fs.img');
    const mnt = path.join(dir, 'mnt');
    const dst = mkdtempSync(path.join(tmpdir(), 'livemig-ddst-'));
    execFileSync('truncate', ['-s', '512M', backing]); // xfs needs 300 MiB at least
    execFileSync('mkfs.xfs', ['-q', '-m', 'reflink=1', backing]);
    execFileSync('mkdir', [mnt]);
    execFileSync('mount', ['-o', 'loop', backing, mnt]);
    try {
      await migrateWithDisk(mnt, dst);
    } finally {
      execFileSync('umount', [mnt]);
      rmSync(dir, { recursive: true, force: true });
      rmSync(dst, { recursive: true, force: true });
    }
  });

  test('a destination that takes no disks refuses before reserving; the source keeps its guest', async () => {
    const src = mkdtempSync(path.join(tmpdir(), 'livemig-dsrc-'));
    const memory = Region.create(4 * MiB, { name: 'disk-refused' });
    const disk = makeDisk(src);
    let resumed = false;
    let reserved = false;
    const rx = await listen('127.0.0.1', 0, { onReserved: () => void (reserved = true), activate: async () => undefined });
    try {
      await assert.rejects(
        migrate({
          region: memory,
          to: { host: '127.0.0.1', port: rx.port },
          disks: [{ name: 'root', fd: disk.fd, path: disk.file, size: DISK }],
          pause: async () => new Uint8Array(0),
          resume: async () => void (resumed = true),
        }),
        /takes none/,
      );
      assert.equal(reserved, false, 'nothing was reserved');
      assert.equal(resumed, false, 'the guest was never paused');
    } finally {
      await rx.close();
      closeSync(disk.fd);
      memory.release();
      rmSync(src, { recursive: true, force: true });
    }
  });
});

test('a disk that does not match its image, or a hostile disk table in HELLO, is refused', async () => {
  const src = mkdtempSync(path.join(tmpdir(), 'livemig-dsrc-'));
  const memory = Region.create(4 * MiB, { name: 'disk-bad' });
  const disk = makeDisk(src);
  try {
    const base = { region: memory, to: { host: '127.0.0.1', port: 9 }, pause: async () => new Uint8Array(0), resume: async () => undefined };
    await assert.rejects(migrate({ ...base, disks: [{ name: 'root', fd: disk.fd, path: disk.file, size: DISK / 2 }] }), /holds 33554432 bytes, its size says/);
    await assert.rejects(migrate({ ...base, disks: [{ name: 'r/oot', fd: disk.fd, path: disk.file, size: DISK }] }), /a name is 1..63 characters/);
    await assert.rejects(
      migrate({
        ...base,
        local: { pieces: [{ fd: memory.fd, offset: 0, size: memory.size }] },
        disks: [{ name: 'root', fd: disk.fd, path: disk.file, size: DISK }],
      }),
      /not with a same-host upgrade/,
    );
    assert.equal(fstatSync(disk.fd).size, DISK, 'the image untouched');
  } finally {
    closeSync(disk.fd);
    memory.release();
    rmSync(src, { recursive: true, force: true });
  }
  const hello = { versions: [3, 3], regionBytes: 8 * MiB, pageSize: 4096, auth: null, capabilities: ['disks', 'holes'] };
  const ok = decodeHello(pack({ ...hello, disks: [{ name: 'root', size: 4 * MiB }] }) as Buffer);
  assert.deepEqual(ok.disks, [{ name: 'root', size: 4 * MiB }]);
  for (const [disks, why] of [
    [
      [
        { name: 'a', size: 4 * MiB },
        { name: 'a', size: 4096 },
      ],
      /taken by another disk/,
    ],
    [[{ name: 'a', size: 1000 }], /positive multiple of 4096/],
    [[{ name: 'a', size: 8 * MiB }], /leaves no memory/],
    [[], /1 to 16 disks/],
    ['root', /1 to 16 disks/],
  ] as const)
    assert.throws(() => decodeHello(pack({ ...hello, disks }) as Buffer), why);
  assert.throws(
    () => decodeHello(pack({ ...hello, disks: [{ name: 'root', size: 4 * MiB }], regions: [{ id: 0, name: 'ram', size: 8 * MiB }] }) as Buffer),
    /besides the disks/,
  );
});

function hasMkfsXfs(): boolean {
  try {
    execFileSync('sh', ['-c', 'command -v mkfs.xfs'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * The example guests' disks (native/guest/example/example_disk.h), through the guest contract:
 * the guest writes random blocks while it moves, reports each after it completed (or, untracked,
 * leaves livemig to find them), and once running at the destination checks every block of
 * the image livemig created there against its model: every acknowledged write is there.
 */
describe('an example guest with a disk, through the guest contract', () => {
  const guest = { size: 64 * MiB, content: 'mixed' as const, rate: 8, pattern: 'uniform' as const, hotSize: 16 * MiB };
  const cases: { kind: 'reference' | 'c'; noTrack: boolean; backend: RegExp }[] = [
    { kind: 'reference', noTrack: false, backend: /disk disk0: reported/ },
    { kind: 'c', noTrack: false, backend: /disk disk0: reported/ },
    { kind: 'reference', noTrack: true, backend: /disk disk0: (hash|reflink)/ },
  ];
  for (const { kind, noTrack, backend } of cases) {
    test(`${kind} guest, ${noTrack ? 'writes not reported' : 'writes reported'}: every block checked at the destination`, async () => {
      const r = await runDemo({ guest: { ...guest, disk: { size: 64 * MiB, rate: 8, noTrack } }, guestKind: kind });
      assert.match(r.tracker_reason ?? '', backend);
      const disk = r.guest_verified.disk;
      assert.ok(disk, 'the destination guest checked its disk');
      assert.equal(disk.bad, 0, `block ${disk.first_bad} differs from the model`);
      assert.equal(disk.blocks, (64 * MiB) / 4096, 'every block was read back');
      assert.ok(Number(disk.writes) > 0, 'the guest wrote its disk while it moved');
      assert.equal(r.guest_verified.bad, 0);
      assert.ok(r.verified);
    });
  }
});

/**
 * Disk post-copy (issue 33, item 6): the guest runs at the destination before its disk is all
 * there; its reads of blocks not yet there wait for them (fanotify pre-content events), its
 * writes are never overwritten by the push, and a link cut in the middle recovers. The guest
 * writes its disk and memory throughout and checks every block once all have arrived.
 */
const precontent = precontentRefusal(tmpdir());
describe('disk post-copy', { skip: precontent ?? false }, () => {
  const guest = { size: 64 * MiB, content: 'mixed' as const, rate: 8, pattern: 'uniform' as const, hotSize: 16 * MiB };
  for (const [mode, prealloc] of [
    ['postcopy', false],
    ['hybrid', false],
    ['postcopy', true],
  ] as const) {
    const how = `${mode}${prealloc ? ', the receiver with --prealloc' : ''}`;
    test(`${how}: the guest's disk accesses wait for missing blocks, and every block checks out`, async () => {
      const r = await runDemo({
        guest: { ...guest, disk: { size: 64 * MiB, rate: 8 } },
        policy: { mode },
        ...(prealloc ? { receiverArgs: ['--prealloc'] } : {}),
      });
      const disk = r.guest_verified.disk!;
      assert.equal(disk.bad, 0, `block ${disk.first_bad} differs from the model`);
      assert.ok(Number(disk.writes) > 0, 'the guest wrote its disk');
      assert.equal(r.mode, mode);
      assert.ok(r.verified);
      if (mode === 'postcopy') assert.ok((r.destination_postcopy?.['disk_accesses'] ?? 0) > 0, 'the guest touched its disk while blocks were missing');
    });
  }

  test('a VMM that asks for its blocks itself: fetched ahead, whole-block writes claimed, none overwritten by the push', async () => {
    const r = await runDemo({ guest: { ...guest, disk: { size: 64 * MiB, rate: 32, ask: true } }, guestKind: 'c', policy: { mode: 'postcopy' } });
    const disk = r.guest_verified.disk!;
    assert.equal(disk.bad, 0, `block ${disk.first_bad} differs from the model`);
    assert.ok(Number(disk.writes) > 0, 'the guest wrote its disk');
    assert.equal(r.mode, 'postcopy');
    const pc = r.destination_postcopy ?? {};
    assert.equal(pc['disk_fetches'], 64, 'the guest fetched its disk ahead, a MiB at a time');
    assert.ok((pc['disk_overwrites'] ?? 0) > 0, 'the guest claimed the blocks it wrote');
    assert.ok((pc['disk_blocks_overwritten'] ?? 0) > 0, 'a write claimed its block instead of fetching it');
    assert.ok(r.verified);
  });

  test('a link cut in the middle of disk post-copy recovers, and every block checks out', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-disk-cut-'));
    const destination = path.join(dir, 'destination');
    mkdirSync(destination);
    let incoming: IncomingGuest | undefined;
    const rx = await listen('127.0.0.1', 0, {
      disks: { dir: destination },
      onReserved: async (region, plan, layout, memory) => {
        incoming = await startReferenceIncoming(region, layout, plan, memory.disks);
      },
      onDiscard: () => incoming?.kill(),
      postcopy: { register: () => incoming!.register() },
      activate: async (_r, ds) => incoming!.activate(ds),
      recoverTimeoutMs: 20_000,
    });
    const observer = await HeartbeatObserver.start();
    const g = await SourceGuest.spawn({ ...guest, heartbeat: observer.address, diskImage: { path: path.join(dir, 'source.img'), size: 64 * MiB, rate: 8 } });
    const proxy = await cuttableProxy(rx.port);
    try {
      const result = rx.next();
      result.catch(() => undefined);
      let cut = false;
      const report = await migrate({
        ...g.memory,
        to: { host: '127.0.0.1', port: proxy.port },
        pause: () => g.pause(),
        resume: () => g.resume(),
        commit: () => g.commit(),
        release: () => g.exit(),
        mode: 'postcopy',
        onProgress: (e) => {
          if (e.type === 'postcopy' && !cut && e.pages_pushed > g.region.pageCount / 4) {
            cut = true;
            proxy.cut();
          }
        },
      });
      const received = await result;
      assert.ok(cut, 'the link was cut in the middle of post-copy');
      assert.ok(report.postcopy!.reconnects >= 1, 'the source reconnected');
      assert.equal(received.digest, report.digest, 'the same memory and disk on both sides');
      incoming!.allPresent();
      const check = await guestCheck({ pid: incoming!.pid, beats: () => observer.beats });
      assert.equal(check.bad, 0);
      const disk = (check as { disk?: { bad: number; firstBad: number; writes: string } }).disk;
      assert.ok(disk, 'the destination guest checked its disk');
      assert.equal(disk.bad, 0, `block ${disk.firstBad} differs from the model`);
    } finally {
      proxy.close();
      g.kill();
      incoming?.kill();
      observer.close();
      await rx.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/**
 * A retry resends only what differs (issue 33, item 7): a migration that fails before the guest
 * runs at the destination leaves its images there (--keep-disks), and the next migration of the
 * same guest takes them back and learns their blocks' hashes: blocks already there go as
 * nothing, blocks written since and holes punched since go again. A kept image of another guest,
 * or one past its time, is not taken.
 */
test('a retry after a failed migration sends only the blocks that changed since', async () => {
  const src = mkdtempSync(path.join(tmpdir(), 'livemig-retry-src-'));
  const dst = mkdtempSync(path.join(tmpdir(), 'livemig-retry-dst-'));
  const memory = Region.create(MiB, { name: 'disk-retry' });
  const disk = makeDisk(src);
  // a MiB of blocks written as zeros: allocated here, a hole there
  writeSync(disk.fd, Buffer.alloc(MiB), 0, MiB, 24 * MiB);
  const rx = await listen('127.0.0.1', 0, { disks: { dir: dst, keepMs: 60_000 }, activate: async () => undefined });
  const base = {
    region: memory,
    to: { host: '127.0.0.1', port: rx.port },
    disks: [{ name: 'root', fd: disk.fd, path: disk.file, size: DISK }],
    guestName: 'retried',
    resume: async () => undefined,
  };
  try {
    // the first try moves every block, then fails at its pause: the destination keeps its image
    const failed = rx.next();
    failed.catch(() => undefined);
    await assert.rejects(
      migrate({
        ...base,
        pause: async () => {
          throw new Error('the guest could not pause');
        },
      }),
    );
    await assert.rejects(failed);
    assert.ok(existsSync(path.join(dst, 'root.img.partial')), 'the image is kept');
    // the guest writes three blocks meanwhile (one of them over what was a hole)
    for (const at of [0, 3 * MiB, 10 * MiB]) writeSync(disk.fd, Buffer.alloc(4096, 0x5a), 0, 4096, at);
    fdatasyncSync(disk.fd);
    const done = rx.next();
    const report = await migrate({ ...base, pause: async () => new Uint8Array(0) });
    await done;
    assert.ok(readFileSync(path.join(dst, 'root.img')).equals(readFileSync(disk.file)), 'the destination disk is the source disk');
    const data = 5 * MiB;
    assert.ok(report.wire_bytes < 3 * 4096 + DISK / 100, `the retry sent ${report.wire_bytes} bytes: only what changed (the data is ${data})`);
    assert.ok(report.skipped_pages >= data / 4096 - 3, `the blocks already there were skipped (${report.skipped_pages})`);
    assert.ok(!existsSync(path.join(dst, 'root.img.partial')), 'the kept image was taken back');
    const there = openSync(path.join(dst, 'root.img'), 'r+');
    const image = Region.adopt(there, DISK);
    try {
      const zeros = await image.dataExtents({ within: Float64Array.of((24 * MiB) / 4096, (25 * MiB) / 4096) });
      assert.equal(zeros.length, 0, 'blocks written as zeros are a hole at the destination');
    } finally {
      image.release();
      closeSync(there);
    }
  } finally {
    await rx.close();
    closeSync(disk.fd);
    memory.release();
    rmSync(src, { recursive: true, force: true });
    rmSync(dst, { recursive: true, force: true });
  }
});

test('a kept image of another guest, or past its time, is not taken back', () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'livemig-kept-'));
  try {
    const made = (guest: string, expires: number): void => {
      writeFileSync(path.join(dir, 'root.img.partial'), Buffer.alloc(4096, 1));
      writeFileSync(path.join(dir, 'root.img.partial.json'), JSON.stringify({ guest, size: 4096, expires }));
    };
    made('someone-else', Date.now() + 60_000);
    assert.deepEqual(takeKeptImages(dir, 'me', [{ name: 'root', size: 4096 }]), [undefined], 'another guest’s');
    assert.ok(existsSync(path.join(dir, 'root.img.partial')), 'it stays for its own guest');
    assert.deepEqual(takeKeptImages(dir, 'someone-else', [{ name: 'root', size: 8192 }]), [undefined], 'a different size');
    made('me', Date.now() - 1);
    assert.deepEqual(takeKeptImages(dir, 'me', [{ name: 'root', size: 4096 }]), [undefined], 'expired');
    assert.ok(!existsSync(path.join(dir, 'root.img.partial')), 'an expired image is removed');
    made('me', Date.now() + 60_000);
    const [taken] = takeKeptImages(dir, 'me', [{ name: 'root', size: 4096 }]);
    assert.ok(taken && existsSync(path.join(dir, 'root.img')), 'its own, in time: taken back');
    closeSync(taken.fd);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
