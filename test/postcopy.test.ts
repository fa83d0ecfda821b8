/**
 * Post-copy: the destination resumes first and pages follow (src/postcopy, native/postcopy/).
 * Needs userfaultfd minor faults on shared memory; skipped with the reason when the kernel lacks them.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import tls from 'node:tls';
import { after, describe, test } from 'node:test';
import { addon } from '../src/native.js';
import { FaultService } from '../src/postcopy/dest.js';
import { PageServer } from '../src/postcopy/source.js';
import { migrate } from '../src/source/migrate.js';
import { MigrationControl } from '../src/source/types.js';
import { LivemigError } from '../src/errors.js';
import { FramedConnection } from '../src/protocol/connection.js';
import { listen } from '../src/receiver/listen.js';
import type { Credentials } from '../src/security/tls.js';
import { makeCa, opensslMissing } from './certs.js';
import type { ReceiveReport } from '../src/receiver/receiver.js';
import { Region } from '../src/region/region.js';
import { fillContent } from '../src/workload/content.js';
import type { IncomingGuest } from '../src/guest/incoming-session.js';
import { HeartbeatObserver, SourceGuest, startReferenceIncoming } from '../src/workload/controller.js';
import { cuttableProxy, guestCheck, minorFaultsReason, tcpPair, until, WorkerWriter } from './helpers.js';
import { FrameType } from '../src/protocol/format.js';

const MiB = 1 << 20;

const skip = minorFaultsReason();
if (skip) console.log(`# skipping post-copy tests: ${skip}`);

async function connectionPair(): Promise<[FramedConnection, FramedConnection, net.Server]> {
  const { client, peer, server } = await tcpPair();
  return [FramedConnection.fromSocket(client), FramedConnection.fromSocket(peer), server];
}

test('the native post-copy services take one options object and name the field that is wrong', () => {
  const region = Region.create(4 * 4096, { name: 'livemig-pc-options' });
  try {
    const onEvent = (): void => undefined;
    const Dest = addon.PostcopyDest as unknown as new (...a: unknown[]) => unknown;
    const dest = { region: region.nativeHandle, uffd: 0, guest: 0n, needed: new Uint8Array(4), hashes: new BigUint64Array(4), version: 3, onEvent };
    assert.throws(() => new Dest(region.nativeHandle, 0), { name: 'TypeError', message: 'PostcopyDest: expects one options object' });
    assert.throws(() => new Dest({ ...dest, region: {} }), { name: 'TypeError', message: 'PostcopyDest: options.region must be a NativeRegion' });
    assert.throws(() => new Dest({ ...dest, uffd: -1 }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.uffd must be an integer from 0 to 2147483647, got -1',
    });
    assert.throws(() => new Dest({ ...dest, guest: 'here' }), {
      name: 'TypeError',
      message: /^PostcopyDest: options\.guest must be a bigint address or an array of/,
    });
    assert.throws(() => new Dest({ ...dest, guest: [{ address: 4096n, firstPage: 0, pages: 3 }] }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.guest: the ranges must cover every page of the memory',
    });
    // disks follow the memory and end the page space, each a run of pages after the one before
    const disk = (firstPage: number, pages: number) => ({ firstPage, pages, dev: 1, ino: 2 });
    assert.throws(() => new Dest({ ...dest, fanotify: 0, disks: [disk(3, 2)] }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.disks: the disks must end the page space',
    });
    assert.throws(() => new Dest({ ...dest, fanotify: 0, disks: [disk(2, 1), disk(2, 1)] }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.disks: the disks must follow the memory in order',
    });
    assert.throws(() => new Dest({ ...dest, fanotify: 0, disks: [] }), {
      name: 'TypeError',
      message: /^PostcopyDest: options\.disks must be a non-empty list/,
    });
    assert.throws(() => new Dest({ ...dest, guest: [{ address: 4096n, firstPage: 0, pages: 4 }], fanotify: 0, disks: [disk(2, 2)] }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.guest: the ranges must cover every page of the memory',
    });
    assert.throws(() => new Dest({ ...dest, needed: new Uint16Array(4) }), { name: 'TypeError', message: 'PostcopyDest: options.needed must be a Uint8Array' });
    assert.throws(() => new Dest({ ...dest, hashes: new BigUint64Array(3) }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.hashes must have one entry per page (4), got 3',
    });
    assert.throws(() => new Dest({ ...dest, version: 256 }), {
      name: 'RangeError',
      message: 'PostcopyDest: options.version must be an integer from 1 to 255, got 256',
    });
    assert.throws(() => new Dest({ ...dest, onEvent: undefined }), { name: 'TypeError', message: 'PostcopyDest: options.onEvent is required' });
    const Source = addon.PostcopySource as unknown as new (...a: unknown[]) => unknown;
    const source = { region: region.nativeHandle, needed: new Uint8Array(4), version: 3, round: 1, onEvent };
    assert.throws(() => new Source({ ...source, round: 1.5 }), {
      name: 'RangeError',
      message: 'PostcopySource: options.round must be an integer from 0 to 4294967295, got 1.5',
    });
    assert.throws(() => new Source({ ...source, hashes: new Uint8Array(4) }), {
      name: 'TypeError',
      message: 'PostcopySource: options.hashes must be a BigUint64Array',
    });
    assert.throws(() => new Source({ ...source, needed: new Uint8Array(5) }), {
      name: 'RangeError',
      message: 'PostcopySource: options.needed must have one entry per page (4), got 5',
    });
    assert.throws(() => new Source({ ...source, onEvent: 'later' }), { name: 'TypeError', message: 'PostcopySource: options.onEvent must be a function' });
  } finally {
    region.release();
  }
});

describe('post-copy fault service (in process)', { skip }, () => {
  test('faults from several threads on the same pages: every page is installed once, with the source content', async () => {
    const size = 16 * MiB;
    const src = Region.create(size, { name: 'livemig-pc-src' });
    await fillContent(src, 'mixed', 7n);
    const dst = Region.create(size, { name: 'livemig-pc-dst', reserve: true });
    dst.populate(); // every page in the memfd's page cache: a guest touch is a minor fault
    const guestView = Region.adopt(dst.fd, size); // the "guest's" mapping, never touched before registration
    const uffd = addon.uffdRegisterMinor(guestView.address, size);
    const hashes = new BigUint64Array(dst.pageCount);
    const faults = new FaultService({ region: dst, uffd, guest: guestView.address, needed: new Uint8Array(dst.pageCount).fill(1), hashes, version: 2 });
    const sentHashes = new BigUint64Array(src.pageCount);
    const server = new PageServer({ region: src, needed: new Uint8Array(src.pageCount).fill(1), version: 2, round: 1, batchPages: 256, hashes: sentHashes });
    const [pushTx, pushRx, s1] = await connectionPair();
    const [prioTx, prioRx, s2] = await connectionPair();
    try {
      faults.start();
      faults.attach(pushRx.handle, prioRx.handle);
      server.attach({ push: pushTx.handle, prio: prioTx.handle, close: () => undefined });
      const srcEvents: string[] = [];
      const complete = new Promise<bigint>((resolve) => server.on((e) => (srcEvents.push(e.type), e.type === 'complete' && resolve(e.digest!))));
      // nothing is pushed: every page must come because a fault asked for it; two hashAll calls
      // (two threads each) read the same pages at once
      const a = new BigUint64Array(dst.pageCount);
      const b = new BigUint64Array(dst.pageCount);
      await Promise.all([addon.hashAll(guestView.nativeHandle, a), addon.hashAll(guestView.nativeHandle, b)]);
      const want = new BigUint64Array(src.pageCount);
      await addon.hashAll(src.nativeHandle, want);
      assert.deepEqual(a, want, 'the guest read the source content');
      assert.deepEqual(b, want);
      assert.deepEqual(sentHashes, want, 'the source hashed each page it served');
      const digest = await complete;
      assert.equal(digest, addon.digestTable(want), 'the destination digest covers every page');
      await faults.done;
      const st = faults.stats();
      assert.equal(st.pages_pulled, dst.pageCount, 'each page pulled');
      assert.equal(st.pages_pushed, 0);
      assert.equal(st.duplicates, 0, 'no page arrived twice');
      assert.ok(st.faults >= dst.pageCount, `at least one fault per page (${st.faults})`);
      assert.ok(st.fault_latency_p50_us > 0);
      const ss = server.stats();
      assert.equal(ss.pages_served, src.pageCount, 'the source served each page once');
      assert.ok(ss.requests >= src.pageCount);
    } finally {
      faults.stop();
      server.close();
      for (const c of [pushTx, pushRx, prioTx, prioRx]) c.close();
      s1.close();
      s2.close();
      addon.closeFd(uffd);
      guestView.release();
      dst.release();
      src.release();
    }
  });

  test(
    "a page that comes on both connections: the first copy to land is the guest's, the rest of the other (half received then) goes to scratch, and " +
      "the guest's write after the mapping survives",
    async () => {
      const size = 4 * MiB;
      const dst = Region.create(size, { name: 'livemig-pc-twice', reserve: true });
      dst.populate();
      const guestView = Region.adopt(dst.fd, size);
      const uffd = addon.uffdRegisterMinor(guestView.address, size);
      const faults = new FaultService({
        region: dst,
        uffd,
        guest: guestView.address,
        needed: new Uint8Array(dst.pageCount).fill(1),
        hashes: new BigUint64Array(dst.pageCount),
        version: 2,
      });
      const [pushTx, pushRx, s1] = await connectionPair();
      const [prioTx, prioRx, s2] = await connectionPair();
      const writer = await WorkerWriter.start(guestView.shareId);
      const page = 5;
      const frameOf = (fill: number): Buffer => {
        const f = Buffer.alloc(12 + 8 + 4 + 4096, fill);
        f.writeUInt16LE(0x4d4c, 0);
        f.writeUInt8(2, 2);
        f.writeUInt8(4, 3);
        f.writeUInt16LE(0, 4);
        f.writeUInt16LE(0, 6);
        f.writeUInt32LE(8 + 4 + 4096, 8);
        f.writeUInt32LE(1, 12);
        f.writeUInt32LE(1, 16);
        f.writeUInt32LE(page, 20);
        return f;
      };
      try {
        faults.start();
        faults.attach(pushRx.handle, prioRx.handle);
        // the push copy (0x11) is half way through the push stream
        const pushed = frameOf(0x11);
        await pushTx.send(pushed.subarray(0, 24 + 2000));
        await new Promise((r) => setTimeout(r, 50));
        // a guest thread touches the page: its fault asks on the priority connection, which answers (0x22)
        const wrote = writer.write(Uint32Array.of(page), 1000);
        const req = await prioTx.next(5_000);
        assert.equal(req.type, FrameType.PageRequest);
        assert.equal(req.payload.readUInt32LE(4), page);
        await prioTx.send(frameOf(0x22));
        await wrote; // the page was mapped, and the guest wrote word 1000 of it
        // the rest of the push copy arrives after the page became the guest's
        await pushTx.send(pushed.subarray(24 + 2000));
        await until('the second copy arrives', () => faults.stats().duplicates >= 1);
        assert.equal(faults.stats().duplicates, 1, 'the second copy was dropped');
        const words = new Uint32Array(guestView.page(page).buffer, guestView.page(page).byteOffset, 1024);
        assert.equal(words[1000], 1001, "the guest's write survives");
        assert.equal(words[0], 0x22222222, 'the page holds the copy that landed first, not the pushed one');
        assert.equal(words[999], 0x22222222, 'not even the part of the pushed copy that arrived before');
      } finally {
        await writer.close();
        faults.stop();
        for (const c of [pushTx, pushRx, prioTx, prioRx]) c.close();
        s1.close();
        s2.close();
        addon.closeFd(uffd);
        guestView.release();
        dst.release();
      }
    },
  );

  test('a push frame with a page outside the region is refused before anything is written', async () => {
    const size = 4 * MiB;
    const dst = Region.create(size, { name: 'livemig-pc-bad', reserve: true });
    dst.populate();
    const guestView = Region.adopt(dst.fd, size);
    const uffd = addon.uffdRegisterMinor(guestView.address, size);
    const faults = new FaultService({
      region: dst,
      uffd,
      guest: guestView.address,
      needed: new Uint8Array(dst.pageCount).fill(1),
      hashes: new BigUint64Array(dst.pageCount),
      version: 2,
    });
    const [pushTx, pushRx, s1] = await connectionPair();
    const [prioTx, prioRx, s2] = await connectionPair();
    try {
      faults.start();
      faults.attach(pushRx.handle, prioRx.handle);
      const frame = Buffer.alloc(12 + 8 + 4 + 4096);
      frame.writeUInt16LE(0x4d4c, 0);
      frame.writeUInt8(2, 2);
      frame.writeUInt8(4, 3);
      frame.writeUInt32LE(8 + 4 + 4096, 8);
      frame.writeUInt32LE(1, 12);
      frame.writeUInt32LE(1, 16);
      frame.writeUInt32LE(dst.pageCount, 20); // one past the last page
      await pushTx.send(frame);
      await assert.rejects(faults.done, (e: Error & { code?: string }) => e.code === 'ERR_LIVEMIG_PAGE_INDEX' && /outside the region/.test(e.message));
    } finally {
      faults.stop();
      for (const c of [pushTx, pushRx, prioTx, prioRx]) c.close();
      s1.close();
      s2.close();
      addon.closeFd(uffd);
      guestView.release();
      dst.release();
    }
  });
});

/** A receiver with a reference guest behind it, and a way to cut its connections. */
async function setup(
  size: number,
  rate: number,
  recoverTimeoutMs = 20_000,
  credentials?: Credentials,
): Promise<{
  guest: SourceGuest;
  observer: HeartbeatObserver;
  result: Promise<ReceiveReport>;
  port: number;
  incoming: () => IncomingGuest;
  close(): Promise<void>;
}> {
  let incoming: IncomingGuest | undefined;
  let closed = false;
  const rx = await listen('127.0.0.1', 0, {
    onReserved: async (region, plan, layout) => {
      incoming = await startReferenceIncoming(region, layout, plan);
    },
    onDiscard: () => incoming?.kill(),
    postcopy: { register: () => incoming!.register() },
    activate: async (_r, ds) => incoming!.activate(ds),
    recoverTimeoutMs,
    ...(credentials ? { credentials } : {}),
  });
  const observer = await HeartbeatObserver.start();
  const guest = await SourceGuest.spawn({ size, content: 'mixed', rate, pattern: 'uniform', heartbeat: observer.address });
  const result = rx.next();
  result.catch(() => undefined);
  return {
    guest,
    observer,
    result,
    port: rx.port,
    incoming: () => incoming!,
    close: async () => {
      if (closed) return;
      closed = true;
      guest.kill();
      incoming?.kill();
      observer.close();
      await rx.close();
    },
  };
}

/** After post-copy: the destination guest checks every page against its model. */
async function verifyDestination(s: Awaited<ReturnType<typeof setup>>): Promise<{ bad: number }> {
  const pid = s.incoming().pid;
  s.incoming().allPresent();
  // waited for by its beats, however long a loaded host takes (test/helpers.ts)
  return guestCheck({ pid, beats: () => s.observer.beats });
}

const psk: Credentials = { kind: 'psk', identity: 'src', key: Buffer.alloc(32, 4) };

describe('post-copy migrations of the reference guest', { skip }, () => {
  let s: Awaited<ReturnType<typeof setup>>;
  after(async () => s?.close());

  test('postcopy: the guest runs at the destination at once, writing, and ends bit-identical', async () => {
    s = await setup(64 * MiB, 64);
    const g = s.guest;
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: s.port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      mode: 'postcopy',
    });
    const rx = await s.result;
    assert.equal(report.mode, 'postcopy');
    assert.equal(rx.mode, 'postcopy');
    assert.equal(rx.digest, report.digest, 'both sides hold the same image');
    assert.equal(report.postcopy!.pages_needed, g.region.pageCount);
    assert.equal(rx.postcopy!.pages_pulled + rx.postcopy!.pages_pushed, g.region.pageCount, 'every page crossed once');
    assert.equal((await verifyDestination(s)).bad, 0);
    // the guest's heartbeat goes on at the destination
    const pid = s.incoming().pid;
    const beats = s.observer.beats.filter((b) => b.pid === pid).length;
    await until('heartbeats continue on the destination', () => s.observer.beats.filter((b) => b.pid === pid).length > beats);
    await s.close();
  });

  test(
    'postcopy over authenticated connections: the priority connection joins with its own handshake, and the image is the same',
    { skip: opensslMissing },
    async () => {
      const { ca, certs } = makeCa(['src', 'dst']);
      s = await setup(64 * MiB, 64, 20_000, { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] });
      const g = s.guest;
      const report = await migrate({
        region: g.region,
        ...(g.target ? { target: g.target } : {}),
        to: { host: '127.0.0.1', port: s.port },
        pause: () => g.pause(),
        resume: () => g.resume(),
        commit: () => g.commit(),
        release: () => g.exit(),
        mode: 'postcopy',
        credentials: { kind: 'cert', ...certs['src']!, ca, peerName: 'dst' },
      });
      const rx = await s.result;
      assert.deepEqual([report.security.auth, report.security.peer, rx.security.peer], ['tls-cert', 'dst', 'src']);
      assert.equal(rx.digest, report.digest, 'both sides hold the same image');
      assert.equal(rx.postcopy!.pages_pulled + rx.postcopy!.pages_pushed, g.region.pageCount, 'every page crossed once');
      assert.equal((await verifyDestination(s)).bad, 0);
      await s.close();
    },
  );

  test('hybrid over an encrypted stream: one pre-copy pass, then only the pages dirtied since are fetched', async () => {
    s = await setup(64 * MiB, 256, 20_000, psk);
    const g = s.guest;
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: s.port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      mode: 'hybrid',
      credentials: psk,
    });
    const rx = await s.result;
    assert.equal(report.mode, 'hybrid');
    assert.equal(report.security.encrypted, true);
    assert.equal(report.rounds, 1);
    const needed = report.postcopy!.pages_needed;
    assert.ok(needed > 0 && needed < g.region.pageCount, `stale pages dropped and fetched again: ${needed}`);
    assert.equal(rx.postcopy!.pages_needed, needed);
    assert.equal(rx.postcopy!.pages_pulled + rx.postcopy!.pages_pushed, needed, 'exactly the stale pages crossed again');
    assert.equal(rx.digest, report.digest);
    assert.equal((await verifyDestination(s)).bad, 0);
    await s.close();
  });

  test('pre-copy that stalls switches to post-copy (stall policy), from a destination guest mapped ahead', async () => {
    s = await setup(64 * MiB, 256);
    const g = s.guest;
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: s.port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      onStall: 'postcopy',
      bandwidthMiBps: 16, // the guest dirties 256 MiB/s: pre-copy cannot converge
      postcopyBandwidthMiBps: 64,
      encodings: { zero: false, dedup: false, compress: false },
    });
    const rx = await s.result;
    assert.equal(report.mode, 'hybrid');
    assert.equal(report.per_round[0]!.max_bandwidth_mib_s, 16);
    assert.equal(report.postcopy!.max_bandwidth_mib_s, 64, "the push went at post-copy's own cap");
    assert.match(report.stop_reason, /switching to post-copy/);
    assert.ok(report.rounds >= 2, `pre-copy ran rounds first (${report.rounds})`);
    assert.equal(rx.mode, 'postcopy');
    assert.equal(rx.digest, report.digest);
    assert.equal(rx.postcopy!.pages_pulled + rx.postcopy!.pages_pushed, report.postcopy!.pages_needed);
    assert.equal((await verifyDestination(s)).bad, 0);
    await s.close();
  });

  test('control.startPostcopy() switches a running pre-copy migration', async () => {
    s = await setup(64 * MiB, 64);
    const g = s.guest;
    const control = new MigrationControl();
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: s.port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      control,
      onProgress: (e) => {
        if (e.type === 'round' && e.round === 1) control.startPostcopy();
        // a cap set while post-copy runs is the push's; pre-copy's no longer applies
        if (e.type === 'activated') control.setPostcopyBandwidth(128);
        if (e.type === 'activated') control.setBandwidth(4);
      },
    });
    const rx = await s.result;
    assert.equal(report.stop_reason, 'post-copy requested');
    assert.equal(report.postcopy!.max_bandwidth_mib_s, 128);
    assert.equal(rx.mode, 'postcopy');
    assert.equal(rx.digest, report.digest);
    assert.equal((await verifyDestination(s)).bad, 0);
    await s.close();
  });

  test('control.startPostcopy() acts after the batch in flight, not at the end of the pass', async () => {
    s = await setup(64 * MiB, 16);
    const g = s.guest;
    const control = new MigrationControl();
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: s.port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      control,
      bandwidthMiBps: 8, // the first pass would take 8 s
      encodings: { zero: false, dedup: false, compress: false },
      onProgress: (e) => e.type === 'handshake' && control.startPostcopy(),
    });
    const rx = await s.result;
    assert.equal(report.stop_reason, 'post-copy requested');
    assert.equal(report.rounds, 1);
    const pages = (64 * MiB) / 4096;
    assert.ok(report.per_round[0]!.pages < pages / 2, `the first pass was cut after a batch: ${report.per_round[0]!.pages} of ${pages} pages sent`);
    assert.equal(report.postcopy!.max_bandwidth_mib_s, 0, "post-copy's push is uncapped unless asked: pre-copy's 8 MiB/s ended at the switch");
    assert.equal(rx.mode, 'postcopy');
    assert.equal(rx.digest, report.digest);
    assert.equal((await verifyDestination(s)).bad, 0);
    await s.close();
  });

  test('a link cut in the middle of encrypted post-copy and restored completes with nothing lost (new connections, new keys)', async () => {
    s = await setup(256 * MiB, 64, 20_000, psk);
    const g = s.guest;
    // a proxy between the two sides that can drop every connection at once
    const proxy = await cuttableProxy(s.port, false);
    const port = proxy.port;
    let cut = false;
    const control = new MigrationControl();
    let cuts = 0;
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      mode: 'postcopy',
      control,
      credentials: psk,
      onProgress: (e) => {
        if (e.type === 'postcopy' && !cut && e.pages_pushed > g.region.pageCount / 4) {
          cut = true;
          cuts++;
          proxy.cut(); // the link goes down; new connections get through again
        }
      },
    });
    proxy.close();
    const rx = await s.result;
    assert.equal(cuts, 1);
    assert.ok(report.postcopy!.reconnects >= 1, 'the source reconnected');
    assert.ok(rx.postcopy!.reconnects >= 1, 'the destination took the new connections');
    assert.equal(rx.digest, report.digest, 'same image on both sides');
    assert.equal((await verifyDestination(s)).bad, 0);
    await s.close();
  });

  test(
    'a post-copy reconnect that reaches an impostor is refused, nothing is pushed to it, and the source keeps its copy',
    { skip: opensslMissing },
    async () => {
      const { ca, certs } = makeCa(['src', 'dst', 'mallory']);
      s = await setup(256 * MiB, 64, 1500, { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] });
      const g = s.guest;
      // an impostor with a certificate from the same CA, for another name: it records what it gets
      let impostorBytes = 0;
      let impostorConnections = 0;
      const impostor = tls.createServer({ cert: certs['mallory']!.cert, key: certs['mallory']!.key, ca, requestCert: true, rejectUnauthorized: false }, (t) => {
        impostorConnections++;
        t.on('data', (d: Buffer) => void (impostorBytes += d.length));
        t.on('error', () => undefined);
      });
      let impostorDials = 0;
      impostor.on('connection', () => void impostorDials++);
      impostor.on('tlsClientError', () => undefined); // the source hangs up on it
      await new Promise<void>((r) => impostor.listen(0, '127.0.0.1', r));
      const proxy = await cuttableProxy(s.port, false, (impostor.address() as net.AddressInfo).port);
      let cut = false;
      const run = migrate({
        region: g.region,
        ...(g.target ? { target: g.target } : {}),
        to: { host: '127.0.0.1', port: proxy.port },
        pause: () => g.pause(),
        resume: () => g.resume(),
        commit: () => g.commit(),
        release: () => g.exit(),
        mode: 'postcopy',
        recoverTimeoutMs: 1500,
        credentials: { kind: 'cert', ...certs['src']!, ca, peerName: 'dst' },
        onProgress: (e) => {
          if (e.type === 'postcopy' && !cut && e.pages_pushed > g.region.pageCount / 4) {
            cut = true;
            proxy.cut();
          }
        },
      });
      await assert.rejects(run, (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CONNECTION' && e.phase === 'postcopy');
      await assert.rejects(s.result, (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_SOURCE_LOST');
      assert.ok(cut, 'the link was cut in the middle of post-copy');
      assert.ok(impostorDials >= 1, `the source's reconnects reached the impostor (${impostorDials})`);
      assert.deepEqual([impostorConnections, impostorBytes], [0, 0], 'no handshake with the impostor completed: no ATTACH, no page reached it');
      assert.equal(g.child.exitCode, null, 'the source copy is kept (paused), not released');
      proxy.close();
      impostor.close();
      await s.close();
    },
  );

  test('a source gone for good: both sides say so clearly; the destination keeps what it has', async () => {
    s = await setup(256 * MiB, 64, 1500);
    const g = s.guest;
    // the source host goes away: after the cut nothing gets through again
    const proxy = await cuttableProxy(s.port, true);
    const port = proxy.port;
    let cut = false;
    const run = migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      mode: 'postcopy',
      recoverTimeoutMs: 1500,
      onProgress: (e) => {
        if (e.type === 'postcopy' && !cut && e.pages_pushed > g.region.pageCount / 4) {
          cut = true;
          proxy.cut();
        }
      },
    });
    await assert.rejects(
      run,
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CONNECTION' && /did not come back/.test(e.message) && e.phase === 'postcopy',
    );
    await assert.rejects(s.result, (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_SOURCE_LOST' && /cannot finish/.test(e.message));
    assert.equal(g.child.exitCode, null, 'the source copy is kept (paused), not released');
    proxy.close();
    await s.close();
  });
});
