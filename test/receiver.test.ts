/** The receiver treats the stream as hostile: each bad input ends with its error, nothing activated. */
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { FrameType, MAX_PAYLOAD } from '../src/protocol/format.js';
import { encodeFrame, encodeHeader, type Frame } from '../src/protocol/frame.js';
import * as M from '../src/protocol/messages.js';
import * as R from './reference/frames.js';
import { listen } from '../src/receiver/listen.js';
import { DIAGNOSTICS_CHANNEL_NAMES } from '../src/trace.js';
import { ReceiverEvent } from '../src/trace-events.js';

const PAGES = 16;
const hello = (o: Partial<M.Hello> = {}): Buffer =>
  M.encodeHello({ versions: [1, 1], regionBytes: PAGES * 4096, pageSize: 4096, auth: null, capabilities: [], ...o });

/** Connects, sends `script` (frames, or functions of what came back), returns the frames received and the receiver's outcome. */
async function session(
  steps: ((got: Frame[]) => Buffer | 'close')[],
  opts: { maxRegionBytes?: number; maxDeviceStateBytes?: number } = {},
): Promise<{ got: Frame[]; error: LivemigError; activated: boolean }> {
  let activated = false;
  const rx = await listen('127.0.0.1', 0, { ...opts, activate: async () => void (activated = true), idleTimeoutMs: 5000 });
  const sock = net.connect(rx.port, '127.0.0.1');
  await once(sock, 'connect');
  const got: Frame[] = [];
  const parser = new R.FrameParser();
  sock.on('data', (c) => parser.push(c, (f) => got.push(f)));
  sock.on('error', () => undefined);
  const outcome = rx.next().then(
    () => {
      throw new Error('the receiver accepted a bad stream');
    },
    (e: unknown) => e as LivemigError,
  );
  let settled = false;
  void outcome.then(() => (settled = true));
  for (const [k, step] of steps.entries()) {
    const out = step(got);
    if (out === 'close') {
      sock.end();
      break;
    }
    sock.write(out);
    // the first frame is answered before anything may follow it (a receiver refuses bytes that
    // come before its answer): wait for the answer, not for a fixed time a loaded host may miss
    for (const t = performance.now(); k === 0 && got.length === 0 && !settled && performance.now() - t < 10_000;) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 30));
  }
  const error = await outcome;
  await new Promise((r) => setTimeout(r, 30));
  sock.destroy();
  await rx.close();
  return { got, error, activated };
}

function pagesFrame(indices: number[]): Buffer {
  const pages = Uint32Array.from(indices);
  const b = Buffer.alloc(R.pagesFrameBytes(pages.length, 4096));
  R.writePagesPrefix(b, 1, pages, 1);
  return b;
}

function lastError(got: Frame[]): M.ErrorMessage {
  const e = got.filter((f) => f.type === FrameType.Error).pop();
  assert.ok(e, 'the receiver sent an ERROR frame');
  return M.decodeError(e.payload);
}

test('a wrong protocol version is refused with ERR_LIVEMIG_VERSION', async () => {
  const h = hello();
  h.writeUInt8(9, 2);
  const r = await session([() => h]);
  assert.equal(r.error.code, 'ERR_LIVEMIG_VERSION');
  assert.equal(lastError(r.got).code, 'ERR_LIVEMIG_VERSION');
  assert.equal(r.activated, false);
  const r2 = await session([() => hello({ versions: [5, 7] })]);
  assert.equal(r2.error.code, 'ERR_LIVEMIG_VERSION');
  assert.match(r2.error.message, /no common protocol version/);
});

test('a truncated frame ends with a connection error and nothing activated', async () => {
  const p = pagesFrame([1, 2]);
  const r = await session([() => hello(), () => p.subarray(0, 5000), () => 'close']);
  assert.equal(r.got[0]?.type, FrameType.Accept);
  assert.equal(r.error.code, 'ERR_LIVEMIG_CONNECTION');
  assert.equal(r.activated, false);
});

test('an out-of-range page index is refused with ERR_LIVEMIG_PAGE_INDEX', async () => {
  const r = await session([() => hello(), () => pagesFrame([0, PAGES])]);
  assert.equal(r.error.code, 'ERR_LIVEMIG_PAGE_INDEX');
  assert.match(r.error.message, new RegExp(`page index ${PAGES} is outside the region's ${PAGES} pages`));
  assert.equal(lastError(r.got).code, 'ERR_LIVEMIG_PAGE_INDEX');
  assert.equal(r.activated, false);
});

test('an oversized frame is refused from its header with ERR_LIVEMIG_FRAME_TOO_LARGE', async () => {
  const h = encodeHeader(FrameType.Pages, 0);
  h.writeUInt32LE(MAX_PAYLOAD + 1, 8);
  const r = await session([() => hello(), () => h]);
  assert.equal(r.error.code, 'ERR_LIVEMIG_FRAME_TOO_LARGE');
  assert.equal(r.activated, false);
});

test('an unknown frame type and a frame out of order are protocol errors', async () => {
  const h = encodeFrame(FrameType.Abort, Buffer.alloc(0));
  h.writeUInt8(99, 3);
  assert.equal((await session([() => hello(), () => h])).error.code, 'ERR_LIVEMIG_PROTOCOL');
  const r = await session([() => pagesFrame([0])]);
  assert.equal(r.error.code, 'ERR_LIVEMIG_PROTOCOL');
  assert.match(r.error.message, /first frame must be HELLO/);
  const early = await session([() => hello(), () => M.encodeActivate(1)]);
  assert.match(early.error.message, /ACTIVATE before a matching COMMIT/);
  assert.equal(early.activated, false);
});

test('a region over the receiver limit is refused before any page moves', async () => {
  const r = await session([() => hello({ regionBytes: 1 << 30 })], { maxRegionBytes: 1 << 20 });
  assert.equal(r.error.code, 'ERR_LIVEMIG_NO_MEMORY');
  assert.equal(r.got.length, 1);
  assert.equal(lastError(r.got).code, 'ERR_LIVEMIG_NO_MEMORY');
});

test('a commitment digest that does not match is refused and nothing activates', async () => {
  const r = await session([
    () => hello(),
    () => pagesFrame(Array.from({ length: PAGES }, (_, i) => i)),
    () => M.encodeDeviceState(Buffer.from('dev'), 1),
    () => M.encodeCommit({ digest: 12345n, pageCount: PAGES }, 1),
    () => M.encodeActivate(1),
  ]);
  assert.equal(r.error.code, 'ERR_LIVEMIG_DIGEST');
  assert.equal(r.activated, false);
});

test('a second DEVICE_STATE, and a COMMIT with activate under version 1 (no capabilities there), are protocol errors; nothing activates', async () => {
  const twice = await session([() => hello(), () => M.encodeDeviceState(Buffer.from('state A'), 1), () => M.encodeDeviceState(Buffer.from('state B'), 1)]);
  assert.equal(twice.error.code, 'ERR_LIVEMIG_PROTOCOL');
  assert.match(twice.error.message, /a second DEVICE_STATE/);
  assert.equal(twice.activated, false);
  const v1 = await session([
    () => hello({ capabilities: ['commit-activate'] }),
    (got) => {
      assert.deepEqual(M.decodeAccept(got.find((f) => f.type === FrameType.Accept)!.payload).capabilities, [], 'version 1 takes no capability');
      return M.encodeDeviceState(Buffer.from('dev'), 1);
    },
    () => M.encodeCommit({ digest: 0n, pageCount: PAGES, activate: true }, 1),
  ]);
  assert.equal(v1.error.code, 'ERR_LIVEMIG_PROTOCOL');
  assert.equal(v1.activated, false);
});

test('without maxRegionBytes the budget is MemAvailable minus a reserve (an eighth of MemTotal, at least 512 MiB)', async () => {
  const { memoryBudget } = await import('../src/receiver/memory-budget.js');
  const mib = (n: number): number => n * 2 ** 20;
  assert.equal(memoryBudget(`MemTotal:       ${16 * 1024 * 1024} kB\nMemAvailable:   ${10 * 1024 * 1024} kB\n`)!.bytes, mib(10 * 1024 - 2 * 1024));
  assert.equal(memoryBudget(`MemTotal:       ${1024 * 1024} kB\nMemAvailable:   ${256 * 1024} kB\n`)!.bytes, 0, 'a small host keeps its 512 MiB');
  assert.equal(memoryBudget('nothing useful'), undefined);
});

test("a control frame's header alone cannot make the receiver hold its length: each type has its limit, the device state its own", async () => {
  // a ROUND_END announcing 60 MiB, whose bytes never come
  const big = await session([() => hello(), () => encodeHeader(FrameType.RoundEnd, 60 << 20, { version: 1 })]);
  assert.equal(big.error.code, 'ERR_LIVEMIG_FRAME_TOO_LARGE');
  assert.match(big.error.message, /announces 62914560 payload bytes \(max 65536 for its type\)/);
  const state = await session([() => hello(), () => M.encodeDeviceState(Buffer.alloc(8192, 1), 1)], { maxDeviceStateBytes: 4096 });
  assert.equal(state.error.code, 'ERR_LIVEMIG_FRAME_TOO_LARGE');
  assert.match(state.error.message, /max 4096 for its type/);
  assert.equal(state.activated, false);
});

test('reserving a large region does not stop the listener: a RESOLVE that comes meanwhile is answered before the reservation ends', async () => {
  const { default: dc } = await import('node:diagnostics_channel');
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined, maxRegionBytes: 4 * 2 ** 30 });
  const order: string[] = [];
  const src = net.connect(rx.port, '127.0.0.1');
  src.on('error', () => undefined);
  const parser = new R.FrameParser();
  src.on('data', (d: Buffer) =>
    parser.push(d, (f) =>
      order.push(f.type === FrameType.Accept ? 'ACCEPT' : `source got ${FrameType[f.type]}: ${f.payload.toString('latin1').slice(0, 200)}`),
    ),
  );
  let asked: Promise<void> | undefined;
  const onReceiver = (m: unknown): void => {
    if ((m as { event?: string }).event === ReceiverEvent.regionAllocated) order.push('allocated');
    if ((m as { event?: string }).event !== ReceiverEvent.reserving || asked) return;
    // while 2 GiB are being allocated: another connection asks about a session
    asked = new Promise<void>((resolve) => {
      const q = net.connect(rx.port, '127.0.0.1', () => q.write(M.encodeResolve({ session: 'ab'.repeat(16) }, 3)));
      const p = new R.FrameParser();
      q.on('error', () => undefined);
      q.on('data', (d: Buffer) => p.push(d, (f) => (order.push(FrameType[f.type]), q.destroy(), resolve())));
    });
  };
  dc.subscribe(DIAGNOSTICS_CHANNEL_NAMES.receiver, onReceiver);
  try {
    const outcome = rx.next();
    outcome.catch(() => undefined);
    src.write(M.encodeHello({ versions: [3, 3], regionBytes: 2 * 2 ** 30, pageSize: 4096, auth: null, capabilities: [] }));
    for (let i = 0; i < 600 && !order.includes('ACCEPT'); i++) await new Promise((r) => setTimeout(r, 50));
    await asked;
    assert.deepEqual(order, ['Error', 'allocated', 'ACCEPT'], 'the RESOLVE (an unknown session: ERROR) was answered while the region was being allocated');
  } finally {
    dc.unsubscribe(DIAGNOSTICS_CHANNEL_NAMES.receiver, onReceiver);
    src.destroy();
    await rx.close();
  }
});
