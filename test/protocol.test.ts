import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pack } from 'msgpackr';
import { LivemigError } from '../src/errors.js';
import { encodeFrame, encodeHeader, type Frame } from '../src/protocol/frame.js';
import * as M from '../src/protocol/messages.js';
import * as R from './reference/frames.js';
import * as F from '../src/protocol/format.js';

const V = F.PROTOCOL_VERSION;
const throwsCode = (fn: () => unknown, code: string, re?: RegExp): void =>
  assert.throws(fn, (e: unknown) => e instanceof LivemigError && e.code === code && (!re || re.test(e.message)));

function parseAll(bytes: Buffer, step: number): Frame[] {
  const p = new R.FrameParser();
  const out: Frame[] = [];
  for (let i = 0; i < bytes.length; i += step) p.push(bytes.subarray(i, i + step), (f) => out.push(f));
  assert.equal(p.pending, 0);
  return out;
}

test('header roundtrip, and every bad header is refused before its payload is allocated', () => {
  const h = encodeHeader(F.FrameType.Commit, 77, { version: V, flags: 3 });
  assert.deepEqual(R.decodeHeader(h), { version: V, type: F.FrameType.Commit, flags: 3, length: 77 });
  const mutate = (off: number, write: (b: Buffer) => void): Buffer => {
    const b = Buffer.from(h);
    write(b);
    void off;
    return b;
  };
  throwsCode(() => R.decodeHeader(mutate(0, (b) => b.writeUInt16LE(0x1234, 0))), 'ERR_LIVEMIG_PROTOCOL', /bad frame magic/);
  throwsCode(() => R.decodeHeader(mutate(0, (b) => b.writeUInt8(0, 3))), 'ERR_LIVEMIG_PROTOCOL', /unknown frame type 0/);
  throwsCode(() => R.decodeHeader(mutate(0, (b) => b.writeUInt8(200, 3))), 'ERR_LIVEMIG_PROTOCOL', /unknown frame type 200/);
  throwsCode(() => R.decodeHeader(mutate(0, (b) => b.writeUInt16LE(1, 6))), 'ERR_LIVEMIG_PROTOCOL', /reserved/);
  throwsCode(() => R.decodeHeader(mutate(0, (b) => b.writeUInt32LE(F.MAX_PAYLOAD + 1, 8))), 'ERR_LIVEMIG_FRAME_TOO_LARGE');
  throwsCode(() => encodeHeader(F.FrameType.Pages, F.MAX_PAYLOAD + 1), 'ERR_LIVEMIG_FRAME_TOO_LARGE');
});

test('the parser yields the same frames however the stream is split, and holds back a truncated one', () => {
  const frames = [
    encodeFrame(F.FrameType.Abort, Buffer.from('x')),
    encodeFrame(F.FrameType.DeviceState, Buffer.alloc(5000, 7)),
    encodeFrame(F.FrameType.Activate, Buffer.alloc(0)),
  ];
  const all = Buffer.concat(frames);
  for (const step of [1, 3, 12, 13, 4096, all.length]) {
    const got = parseAll(all, step);
    assert.deepEqual(
      got.map((f) => [f.type, f.payload.length]),
      [
        [F.FrameType.Abort, 1],
        [F.FrameType.DeviceState, 5000],
        [F.FrameType.Activate, 0],
      ],
    );
  }
  const p = new R.FrameParser();
  const out: Frame[] = [];
  p.push(all.subarray(0, F.HEADER_BYTES + 100), (f) => out.push(f));
  p.push(all.subarray(F.HEADER_BYTES + 1, F.HEADER_BYTES + 50), (f) => out.push(f));
  assert.equal(out.length, 1);
  assert.ok(p.pending > 0, 'an incomplete frame is pending, not delivered');
});

test('every control message roundtrips', () => {
  const one = (buf: Buffer): Buffer => parseAll(buf, buf.length)[0]!.payload;
  const hello: M.Hello = { versions: [1, 1], regionBytes: 1 << 30, pageSize: 4096, auth: null, capabilities: ['x'] };
  assert.deepEqual(M.decodeHello(one(M.encodeHello(hello))), hello);
  assert.deepEqual(M.decodeHello(one(M.encodeHello({ ...hello, guest: 'vm-01.a_b' }))), { ...hello, guest: 'vm-01.a_b' });
  assert.deepEqual(M.decodeAccept(one(M.encodeAccept({ version: 1, capabilities: [] }, V))), { version: 1, capabilities: [] });
  assert.deepEqual(M.decodeError(one(M.encodeError({ code: 'ERR_LIVEMIG_DIGEST', message: 'm', phase: 'commit' }, V))), {
    code: 'ERR_LIVEMIG_DIGEST',
    message: 'm',
    phase: 'commit',
  });
  assert.deepEqual(M.decodeRoundEnd(one(M.encodeRoundEnd({ round: 3, pages: 9 }, V))), { round: 3, pages: 9 });
  assert.deepEqual(M.decodeRoundAck(one(M.encodeRoundAck({ round: 3, pages: 9 }, V))), { round: 3, pages: 9 });
  assert.deepEqual(M.decodeCommit(one(M.encodeCommit({ digest: 0xffffffffffffffffn, pageCount: 5 }, V))), { digest: 0xffffffffffffffffn, pageCount: 5 });
  assert.deepEqual(M.decodeCommitAck(one(M.encodeCommitAck({ digest: 1n }, V))), { digest: 1n });
  assert.deepEqual(M.decodeActivated(one(M.encodeActivated({ activateMs: 1.5 }, V))), { activateMs: 1.5 });
  assert.deepEqual(M.decodeAbort(one(M.encodeAbort({ reason: 'r' }, V))), { reason: 'r' });
  assert.deepEqual(one(M.encodeDeviceState(Buffer.from('blob'), V)).toString(), 'blob');
  assert.deepEqual(M.decodeResolve(one(M.encodeResolve({ session: 'a'.repeat(32) }, V))), { session: 'a'.repeat(32) });
  for (const outcome of ['activated', 'not-activated'] as const) assert.deepEqual(M.decodeResolved(one(M.encodeResolved({ outcome }, V))), { outcome });
});

test('control decoders reject wrong values', () => {
  const hello = { versions: [1, 1], regionBytes: 4096, pageSize: 4096, auth: null, capabilities: [] };
  const bad = (o: object): Buffer => pack({ ...hello, ...o }) as Buffer;
  throwsCode(() => M.decodeHello(Buffer.from([0x82, 0xa1])), 'ERR_LIVEMIG_PROTOCOL', /not valid msgpack/);
  throwsCode(() => M.decodeHello(pack([1, 2]) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /not a map/);
  throwsCode(() => M.decodeHello(bad({ versions: [2, 1] })), 'ERR_LIVEMIG_PROTOCOL', /versions/);
  throwsCode(() => M.decodeHello(bad({ regionBytes: -1 })), 'ERR_LIVEMIG_PROTOCOL', /regionBytes/);
  throwsCode(() => M.decodeHello(bad({ regionBytes: 1.5 })), 'ERR_LIVEMIG_PROTOCOL', /regionBytes/);
  throwsCode(() => M.decodeHello(bad({ auth: { psk: 'x' } })), 'ERR_LIVEMIG_PROTOCOL', /auth must be null/);
  for (const guest of ['', 'a/b', '../x', 'x'.repeat(64), 7]) throwsCode(() => M.decodeHello(bad({ guest })), 'ERR_LIVEMIG_PROTOCOL', /HELLO guest/);
  throwsCode(() => M.decodeError(pack({ code: 'EVIL', message: '', phase: '' }) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /ERR_LIVEMIG_/);
  throwsCode(() => M.decodeCommit(pack({ digest: -1n, pageCount: 1 }) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /u64 digest/);
  throwsCode(() => M.decodeCommit(pack({ digest: 5, pageCount: 1 }) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /u64 digest/);
  throwsCode(() => M.decodeRoundEnd(pack({ round: 'x', pages: 1 }) as Buffer), 'ERR_LIVEMIG_PROTOCOL');
  throwsCode(() => M.decodeActivated(pack({ activateMs: -1 }) as Buffer), 'ERR_LIVEMIG_PROTOCOL');
  throwsCode(() => M.decodeResolve(pack({ session: 'A'.repeat(32) }) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /32 hex digits/);
  throwsCode(() => M.decodeResolve(pack({ session: 'a'.repeat(33) }) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /32 hex digits/);
  throwsCode(() => M.decodeResolved(pack({ outcome: 'maybe' }) as Buffer), 'ERR_LIVEMIG_PROTOCOL', /activated or not-activated/);
});

test('PAGES batches: layout roundtrip and shape checks', () => {
  const pages = Uint32Array.of(3, 9);
  const buf = Buffer.alloc(R.pagesFrameBytes(2, 4096));
  R.writePagesPrefix(buf, 7, pages, V);
  buf.fill(0xaa, R.pagesDataOffset(2));
  const f = parseAll(buf, 1000)[0]!;
  const b = R.decodePages(f.payload, 4096);
  assert.equal(b.round, 7);
  assert.deepEqual(Array.from(b.indices), [3, 9]);
  assert.equal(b.data.length, 8192);
  const prefix = (count: number, extra: number): Buffer => {
    const p = Buffer.alloc(8 + extra);
    p.writeUInt32LE(1, 0);
    p.writeUInt32LE(count, 4);
    return p;
  };
  throwsCode(() => R.decodePages(Buffer.alloc(4), 4096), 'ERR_LIVEMIG_PROTOCOL', /shorter than its prefix/);
  throwsCode(() => R.decodePages(prefix(0, 0), 4096), 'ERR_LIVEMIG_PAGE_INDEX', /count 0/);
  throwsCode(() => R.decodePages(prefix(F.MAX_BATCH_PAGES + 1, 0), 4096), 'ERR_LIVEMIG_PAGE_INDEX', /count 4097/);
  throwsCode(() => R.decodePages(prefix(2, 4 * 2 + 4096), 4096), 'ERR_LIVEMIG_PROTOCOL', /must be 8208 bytes, got 4112/);
});

test('version negotiation takes the newest common version', () => {
  assert.equal(M.negotiateVersion([1, 1]), 1);
  assert.equal(M.negotiateVersion([1, 9]), F.PROTOCOL_VERSION);
  assert.equal(M.negotiateVersion([2, 9]), F.PROTOCOL_VERSION);
  assert.equal(M.negotiateVersion([1, 2]), 2, 'an older peer gets its newest');
  assert.equal(M.negotiateVersion([0, 0]), undefined);
});
