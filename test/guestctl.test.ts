/**
 * The hand-over's fast paths: the guest's control thread and run gate (native/refguest/gate.cc),
 * the incoming guest's go socket, control frames written and read on the calling thread
 * (Wire.writeNow/readNow), and the scheduling hint (src/sched.ts).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { addon } from '../src/native.js';
import { guestAddon } from '../src/workload/guest-addon.js';
import { FrameType } from '../src/protocol/format.js';
import { encodeFrame, encodeHeader } from '../src/protocol/frame.js';
import { WireChannel } from '../src/protocol/wire.js';
import { Region } from '../src/region/region.js';
import { preferShortSlices, defaultSlices } from '../src/sched.js';
import { IncomingGuest } from '../src/workload/controller.js';
import { LivemigError } from '../src/errors.js';
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

const P = 0x50;
const R = 0x52;

test('a pause through the control thread stops writes and beats, and answers the run state of that moment', async () => {
  // this file's process is the "guest": the gate is process-wide
  const region = Region.create(16 * 4096, { name: 'gate' });
  const st = new BigUint64Array([12345n, 0n, 7n]);
  const [mine, theirs] = addon.socketPair();
  guestAddon.gateStart(mine, st);
  try {
    assert.equal(guestAddon.guestWrite(region.address, region.size, st, 100, 16, false), 100);
    assert.equal(guestAddon.gateBeat(st), 7);
    const paused = addon.controlRequest(theirs, P, 2000);
    assert.equal(String.fromCharCode(paused.tag), 'p');
    const run = new BigUint64Array(paused.body.buffer.slice(paused.body.byteOffset, paused.body.byteOffset + 24));
    assert.deepEqual([...run], [...st], 'the reply is the state the guest stopped in');
    assert.equal(run[1], 100n);
    assert.equal(run[2], 8n);
    assert.equal(guestAddon.gatePaused(), true);
    if (process.getuid?.() === 0) {
      // paused, every other thread of the guest runs only on otherwise idle CPUs (set just
      // after the answer: wait for it)
      for (let i = 0; i < 200 && threadPolicies().filter((p) => p === SCHED_IDLE).length < threadPolicies().length - 1; i++) await new Promise((r) => setTimeout(r, 5));
      const idle = threadPolicies().filter((p) => p === SCHED_IDLE).length;
      assert.equal(idle, threadPolicies().length - 1, 'all but the control thread are SCHED_IDLE while paused');
    }
    const before = Buffer.from(region.view());
    assert.equal(guestAddon.guestWrite(region.address, region.size, st, 100, 16, false), 0, 'no write passes a closed gate');
    assert.equal(guestAddon.gateBeat(st), -1, 'a paused guest does not beat');
    assert.ok(before.equals(Buffer.from(region.view())));
    assert.deepEqual([...st], [...run]);

    assert.equal(String.fromCharCode(addon.controlRequest(theirs, R, 2000).tag), 'r');
    assert.equal(guestAddon.gatePaused(), false);
    assert.equal(threadPolicies().filter((p) => p === SCHED_IDLE).length, 0, 'resumed, no thread is left SCHED_IDLE');
    assert.equal(guestAddon.guestWrite(region.address, region.size, st, 10, 16, false), 10);
    assert.equal(String.fromCharCode(addon.controlRequest(theirs, 0x21, 2000).tag), 'e', 'an unknown request is answered, not ignored');
    assert.throws(() => addon.controlRequest(theirs, P, 2000, Buffer.alloc(5000)), /longer than 4096/);
  } finally {
    guestAddon.gateSetPaused(false);
    addon.closeFd(theirs); // the control thread sees the end of the stream and stops
    region.release();
  }
});

test('a control request nobody answers times out instead of blocking', () => {
  const [a, b] = addon.socketPair();
  try {
    assert.throws(
      () => addon.controlRequest(a, P, 50),
      (e: Error & { errnoName?: string }) => e.errnoName === 'ETIMEDOUT',
    );
  } finally {
    addon.closeFd(a);
    addon.closeFd(b);
  }
});

test('an incoming guest refuses a state it cannot load while the source can still resume, and starts on go after a good one', async () => {
  const region = Region.create(64 * 4096, { name: 'incoming', reserve: true });
  const bad = new IncomingGuest(region);
  try {
    await bad.ready;
    await assert.rejects(bad.prepare(Buffer.from(JSON.stringify({ version: 9 }))), (e: LivemigError) => e.code === 'ERR_LIVEMIG_GUEST' && /refused 'S'.*version 9/.test(e.message));
  } finally {
    bad.kill();
  }
  const good = new IncomingGuest(region);
  try {
    await good.ready;
    const state = { version: 1, size: region.size, content: 'zero', seed: '1', pattern: 'uniform', span: 64, rate: 0, xs: '1', writes: '0', heartbeatSeq: 0, throttle: 0 };
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
  const a = WireChannel.fromSocket(client);
  const b = WireChannel.fromSocket(peer);
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
