/**
 * The hand-over's fast paths: the guest library's control thread and the reference guest's run
 * gate (native/refguest/gate.cc), the incoming guest's socket, control frames written and read on the calling thread
 * (Wire.writeNow/readNow), and the scheduling hint (src/sched.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { addon } from '../src/native.js';
import { guestAddon } from '../src/workload/guest-addon.js';
import { FrameType } from '../src/protocol/format.js';
import { encodeFrame, encodeHeader } from '../src/protocol/frame.js';
import { FramedConnection } from '../src/protocol/connection.js';
import { Region } from '../src/region/region.js';
import { preferShortSlices, defaultSlices } from '../src/sched.js';
import { GuestLayout } from '../src/guest/layout.js';
import { SourceGuestSession } from '../src/guest/source-session.js';
import { startReferenceIncoming } from '../src/workload/controller.js';
import { LivemigError } from '../src/errors.js';
import { Tag } from '../src/guest/contract.js';
import { tcpPair } from './helpers.js';
import { readdirSync, readFileSync } from 'node:fs';

/** Scheduling policy of each thread of this process (field 41 of /proc/self/task/TID/stat). */
function threadPolicies(): number[] {
  const out: number[] = [];
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8');
      out.push(Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[41 - 3]));
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}
const SCHED_IDLE = 5;

test('the guest library pauses writes and beats, answers the state of that moment, and refuses what it must', async () => {
  // this file's process is the "guest": the gate is process-wide
  const region = Region.create(16 * 4096, { name: 'gate' });
  const st = new BigUint64Array([12345n, 0n, 7n]);
  const path = `@livemig-test-gate-${process.pid}`;
  guestAddon.serve(path, [{ address: region.address, size: region.size, fd: region.fd, tracked: false }], st, '{"version":1,"size":65536');
  const session = await SourceGuestSession.connect(path);
  try {
    assert.equal(session.hello.name, 'reference-guest');
    assert.equal(session.tracking, 'none');
    assert.equal(session.target, undefined, 'no tracking registered: livemig hashes');
    assert.equal(guestAddon.guestWrite(region.address, region.size, st, 100, 16, false), 100);
    assert.equal(guestAddon.gateBeat(st), 7);
    const state = JSON.parse(session.pause().toString()) as Record<string, unknown>;
    assert.deepEqual(
      state,
      { version: 1, size: 65536, xs: st[0]!.toString(), writes: '100', heartbeatSeq: 8, throttle: 0 },
      'the reply is the state the guest stopped in',
    );
    assert.equal(guestAddon.gatePaused(), true);
    if (process.getuid?.() === 0) {
      // paused, every other thread of the guest runs only on otherwise idle CPUs (set just
      // after the answer: wait for it)
      for (let i = 0; i < 200 && threadPolicies().filter((p) => p === SCHED_IDLE).length < threadPolicies().length - 1; i++)
        await new Promise((r) => setTimeout(r, 5));
      const idle = threadPolicies().filter((p) => p === SCHED_IDLE).length;
      assert.equal(idle, threadPolicies().length - 1, 'all but the control thread are SCHED_IDLE while paused');
    }
    const before = Buffer.from(region.view());
    const stBefore = [...st];
    assert.equal(guestAddon.guestWrite(region.address, region.size, st, 100, 16, false), 0, 'no write passes a closed gate');
    assert.equal(guestAddon.gateBeat(st), -1, 'a paused guest does not beat');
    assert.ok(before.equals(Buffer.from(region.view())));
    assert.deepEqual([...st], stBefore);
    session.resume();
    assert.equal(guestAddon.gatePaused(), false);
    assert.equal(threadPolicies().filter((p) => p === SCHED_IDLE).length, 0, 'resumed, no thread is left SCHED_IDLE');
    assert.equal(guestAddon.guestWrite(region.address, region.size, st, 10, 16, false), 10);
    session.throttle(30);
    assert.equal(guestAddon.gateThrottle(), 30);
    assert.throws(() => session.throttle(100), /0\.\.99/);
  } finally {
    session.close();
  }
  // a second livemig after the first went away, speaking the wire itself
  const fd = addon.unixConnect(path);
  try {
    const hello = addon.controlReceive(fd, 2000);
    assert.equal(hello.tag, Tag.hello);
    assert.equal(hello.fds.length, 1, 'a memfd for the one region');
    for (const f of hello.fds) addon.closeFd(f);
    const unknown = addon.controlRequest(fd, 0x21, 2000);
    assert.equal(unknown.tag, Tag.error, 'an unknown request is answered, not ignored');
    assert.match(unknown.body.toString(), /unknown request 0x21/);
    const release = addon.controlRequest(fd, Tag.release, 2000);
    assert.equal(release.tag, Tag.error, 'no release without a committed pause');
    assert.match(release.body.toString(), /would be lost/);
    assert.throws(() => addon.controlRequest(fd, Tag.pause, 2000, Buffer.alloc(65 * 1024 * 1024)), /longer than 64 MiB/);
    // a pause with a lease of 50 ms and then silence: the guest resumes itself and refuses to commit
    const lease = Buffer.alloc(4);
    lease.writeUInt32LE(50);
    assert.equal(addon.controlRequest(fd, Tag.pause, 2000, lease).tag, Tag.paused);
    for (let i = 0; i < 100 && guestAddon.gatePaused(); i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(guestAddon.gatePaused(), false, 'the lease ran out: resumed');
    const commit = addon.controlRequest(fd, Tag.commit, 2000);
    assert.equal(commit.tag, Tag.error);
    assert.match(commit.body.toString(), /resumed itself/);
  } finally {
    addon.closeFd(fd);
    region.release();
  }
});

test('a control request nobody answers times out instead of blocking', () => {
  const [a, b] = addon.socketPair();
  try {
    assert.throws(
      () => addon.controlRequest(a, Tag.pause, 50),
      (e: Error & { errnoName?: string }) => e.errnoName === 'ETIMEDOUT',
    );
  } finally {
    addon.closeFd(a);
    addon.closeFd(b);
  }
});

test('an incoming guest refuses a state it cannot load while the source can still resume, and starts on go after a good one', async () => {
  const region = Region.create(64 * 4096, { name: 'incoming', reserve: true });
  const layout = GuestLayout.single(region.size);
  const bad = await startReferenceIncoming(region, layout);
  try {
    await assert.rejects(
      bad.prepare(Buffer.from(JSON.stringify({ version: 9 }))),
      (e: LivemigError) => e.code === 'ERR_LIVEMIG_GUEST' && /refused 'S'.*version 9/.test(e.message),
    );
  } finally {
    bad.kill();
  }
  const good = await startReferenceIncoming(region, layout);
  try {
    assert.equal(good.hello.role, 'incoming');
    const state = {
      version: 1,
      size: region.size,
      content: 'zero',
      seed: '1',
      pattern: 'uniform',
      span: 64,
      rate: 0,
      xs: '1',
      writes: '0',
      heartbeatSeq: 0,
      throttle: 0,
    };
    await good.prepare(Buffer.from(JSON.stringify(state)));
    await good.activate(Buffer.from(JSON.stringify(state)));
    assert.equal(good.child.exitCode, null, 'the guest runs');
  } finally {
    good.kill();
    region.release();
  }
});

test('readNow takes a control frame only once it is whole, never pages; send goes at once and keeps order', async () => {
  const { client, peer, server } = await tcpPair();
  const a = FramedConnection.fromSocket(client);
  const b = FramedConnection.fromSocket(peer);
  try {
    const frame = encodeFrame(FrameType.Commit, Buffer.alloc(20, 7));
    // half a frame: nothing yet, and the half stays for a read that waits
    await a.send(frame.subarray(0, 15));
    await new Promise((r) => setTimeout(r, 20));
    const next = b.next();
    await a.send(frame.subarray(15));
    const f = await next;
    assert.equal(f.type, FrameType.Commit);
    assert.ok(f.payload.equals(Buffer.alloc(20, 7)));
    // a pages header is left to the waiting read, which checks it
    const pages = encodeHeader(FrameType.Pages, 0);
    await a.send(pages);
    await new Promise((r) => setTimeout(r, 20));
    const g = await b.next();
    assert.equal(g.type, FrameType.Pages);
    // many small frames from this thread arrive in order
    for (let i = 0; i < 200; i++) void a.send(encodeFrame(FrameType.RoundEnd, Buffer.from([i & 255])));
    for (let i = 0; i < 200; i++) assert.equal((await b.next()).payload[0], i & 255);
  } finally {
    a.close();
    b.close();
    server.close();
  }
});

test('short slices: the kernel takes them (Linux >= 6.12) and a guest goes back to the default', (t) => {
  assert.throws(() => preferShortSlices(50), /100\.\.100000/);
  const r = preferShortSlices(100);
  if (!r.applied) {
    t.skip(`this kernel does not take custom slices (${r.threads} threads asked)`);
    return;
  }
  assert.ok(r.threads >= 1);
  assert.equal(defaultSlices().threads, r.threads);
});
