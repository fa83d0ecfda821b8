/**
 * The native data path agrees with the protocol's reference encoder and parser (src/protocol):
 * what sendPages writes parses as PAGES frames carrying the region's bytes, what the reference
 * encoder writes lands in the region through a page sink, and the page hash is one function
 * on every instruction set.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { once } from 'node:events';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { addon } from '../src/native.js';
import { guestAddon } from '../src/workload/guest-addon.js';
import { FrameType } from '../src/protocol/format.js';
import { encodeFrame, encodeHeader, type Frame } from '../src/protocol/frame.js';
import { FramedConnection } from '../src/protocol/connection.js';
import * as M from '../src/protocol/messages.js';
import * as R from './reference/frames.js';
import { Region } from '../src/region/region.js';
import { tcpPair } from './helpers.js';

const PS = 4096;

/** A connected loopback pair: `a` taken over by a FramedConnection, `b` a plain socket. */
async function pair(): Promise<{ wire: FramedConnection; peer: net.Socket; server: net.Server }> {
  const { client, peer, server } = await tcpPair();
  peer.resume();
  return { wire: FramedConnection.fromSocket(client), peer, server };
}

function fillRandom(region: Region): void {
  for (let i = 0; i < region.pageCount; i++) region.page(i).set(randomBytes(PS));
}

test('sendPages writes PAGES frames that the reference parser reads back as the region, and records each page hash', async () => {
  const { wire, peer, server } = await pair();
  const region = Region.create(64 * PS, { name: 'wire-send' });
  fillRandom(region);
  const hashes = new BigUint64Array(region.pageCount);
  const frames: Frame[] = [];
  const parser = new R.FrameParser();
  peer.on('data', (c: Buffer) => parser.push(c, (f) => frames.push(f)));
  const pages = Uint32Array.from([0, 1, 2, 7, 9, 10, 40, 41, 63]); // runs and singles, strictly increasing (a frame's rule)
  const { bytes } = await wire.sendPages({ region, pages, round: 5, version: 1, batchPages: 4, hashes });
  await wire.send(encodeFrame(FrameType.RoundEnd, Buffer.alloc(0)));
  while (!frames.some((f) => f.type === FrameType.RoundEnd)) await new Promise((r) => setTimeout(r, 5));
  const batches = frames.filter((f) => f.type === FrameType.Pages).map((f) => R.decodePages(f.payload, PS));
  assert.deepEqual(
    batches.map((b) => b.indices.length),
    [4, 4, 1],
    'batches of at most 4 pages',
  );
  assert.equal(
    bytes,
    batches.reduce((n, b) => n + 12 + 8 + b.indices.length * (4 + PS), 0),
  );
  const seen = batches.flatMap((b) => [...b.indices]);
  assert.deepEqual(seen, [...pages]);
  for (const b of batches) {
    assert.equal(b.round, 5);
    b.indices.forEach((p, k) => assert.ok(b.data.subarray(k * PS, (k + 1) * PS).equals(region.page(p)), `page ${p} carried intact`));
  }
  for (let p = 0; p < region.pageCount; p++) {
    assert.equal(hashes[p], pages.includes(p) ? addon.pageHash(Buffer.from(region.page(p))) : 0n, `hash of page ${p}`);
  }
  wire.close();
  peer.destroy();
  server.close();
  region.release();
});

test('a read with a page sink applies reference-encoded PAGES frames and returns the next control frame', async () => {
  const { wire, peer, server } = await pair();
  const region = Region.create(32 * PS, { name: 'wire-recv' });
  const hashes = new BigUint64Array(region.pageCount);
  const src = Array.from({ length: 32 }, () => randomBytes(PS));
  const frame = (idx: number[], round: number): Buffer => {
    const b = Buffer.alloc(R.pagesFrameBytes(idx.length, PS));
    R.writePagesPrefix(b, round, Uint32Array.from(idx), 1);
    idx.forEach((p, k) => src[p]!.copy(b, R.pagesDataOffset(idx.length) + k * PS));
    return b;
  };
  const stream = Buffer.concat([frame([3, 4, 5], 1), frame([31], 1), frame([0, 20], 2), M.encodeRoundEnd({ round: 2, pages: 6 }, 1)]);
  // dribble it in small pieces: the native parser must wait for every part
  for (let i = 0; i < stream.length; i += 1000) peer.write(stream.subarray(i, i + 1000));
  const f = await wire.next(undefined, { region, hashes, version: 1 });
  assert.equal(f.type, FrameType.RoundEnd);
  assert.deepEqual(M.decodeRoundEnd(f.payload), { round: 2, pages: 6 });
  assert.equal(f.pages, 6);
  assert.equal(f.batches, 3);
  assert.equal(f.lastRound, 2);
  for (let p = 0; p < 32; p++) {
    const expected = [0, 3, 4, 5, 20, 31].includes(p) ? src[p]! : Buffer.alloc(PS);
    assert.ok(Buffer.from(region.page(p)).equals(expected), `page ${p}`);
    assert.equal(hashes[p], [0, 3, 4, 5, 20, 31].includes(p) ? addon.pageHash(expected) : 0n);
  }
  wire.close();
  peer.destroy();
  server.close();
  region.release();
});

test('the native parser refuses what the reference parser refuses, before touching the region', async () => {
  const cases: [string, Buffer, string, RegExp][] = [
    ['bad magic', Buffer.concat([Buffer.from([1, 2]), encodeHeader(FrameType.Abort, 0).subarray(2)]), 'ERR_LIVEMIG_PROTOCOL', /magic/],
    [
      'unknown type',
      (() => {
        const h = encodeHeader(FrameType.Abort, 0);
        h.writeUInt8(99, 3);
        return h;
      })(),
      'ERR_LIVEMIG_PROTOCOL',
      /unknown frame type 99/,
    ],
    [
      'oversized',
      (() => {
        const h = encodeHeader(FrameType.Abort, 0);
        h.writeUInt32LE(0xffffffff, 8);
        return h;
      })(),
      'ERR_LIVEMIG_FRAME_TOO_LARGE',
      /max/,
    ],
    [
      'flags on PAGES',
      (() => {
        const b = Buffer.alloc(R.pagesFrameBytes(1, PS));
        R.writePagesPrefix(b, 1, Uint32Array.from([0]), 1);
        b.writeUInt16LE(0xffff, 4);
        return b;
      })(),
      'ERR_LIVEMIG_PROTOCOL',
      /flags 0xffff/,
    ],
    ['a flag DEVICE_STATE does not define', encodeHeader(FrameType.DeviceState, 0, { version: 3, flags: 0x2 }), 'ERR_LIVEMIG_PROTOCOL', /flags 0x2/],
    [
      'index out of range',
      (() => {
        const b = Buffer.alloc(R.pagesFrameBytes(2, PS), 0xee);
        R.writePagesPrefix(b, 1, Uint32Array.from([1, 8]), 1);
        return b;
      })(),
      'ERR_LIVEMIG_PAGE_INDEX',
      /page index 8/,
    ],
    [
      'a page twice in one frame',
      (() => {
        const b = Buffer.alloc(R.pagesFrameBytes(2, PS), 0xee);
        R.writePagesPrefix(b, 1, Uint32Array.from([5, 5]), 1);
        return b;
      })(),
      'ERR_LIVEMIG_PAGE_INDEX',
      /page index 5 follows 5: .*strictly increasing/,
    ],
    [
      'indices that go back',
      (() => {
        const b = Buffer.alloc(R.pagesFrameBytes(2, PS), 0xee);
        R.writePagesPrefix(b, 1, Uint32Array.from([7, 3]), 1);
        return b;
      })(),
      'ERR_LIVEMIG_PAGE_INDEX',
      /page index 3 follows 7/,
    ],
    [
      'count zero',
      (() => {
        const b = Buffer.alloc(12 + 8);
        encodeHeader(FrameType.Pages, 8, { version: 1, into: b });
        return b;
      })(),
      'ERR_LIVEMIG_PAGE_INDEX',
      /count 0/,
    ],
    [
      'wrong length',
      (() => {
        const b = Buffer.alloc(12 + 8 + 4 + 10);
        encodeHeader(FrameType.Pages, 22, { version: 1, into: b });
        b.writeUInt32LE(1, 16);
        return b;
      })(),
      'ERR_LIVEMIG_PROTOCOL',
      /must be/,
    ],
    [
      'other version',
      (() => {
        const b = Buffer.alloc(R.pagesFrameBytes(1, PS));
        R.writePagesPrefix(b, 1, Uint32Array.from([0]), 2);
        return b;
      })(),
      'ERR_LIVEMIG_VERSION',
      /version 2/,
    ],
  ];
  for (const [name, bytes, code, re] of cases) {
    const { wire, peer, server } = await pair();
    const region = Region.create(8 * PS, { name: 'wire-bad' });
    const hashes = new BigUint64Array(region.pageCount);
    peer.write(bytes);
    // a deadline: a parser that takes the frame fails the case on the timeout instead of hanging
    await assert.rejects(
      wire.next(10_000, { region, hashes, version: 1 }),
      (e: unknown) => e instanceof LivemigError && e.code === code && re.test(e.message),
      name,
    );
    assert.ok(Buffer.from(region.view(0, region.size)).equals(Buffer.alloc(region.size)), `${name}: the region is untouched`);
    assert.equal(wire.closed, false, `${name}: an ERROR frame can still be sent`);
    wire.close();
    peer.destroy();
    server.close();
    region.release();
  }
});

test('a connection something already read from is refused', async () => {
  const server = net.createServer((s) => s.write('hi'));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'data');
  assert.throws(
    () => FramedConnection.fromSocket(client),
    (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_INVALID_ARGUMENT' && /already read/.test(e.message),
  );
  client.destroy();
  server.close();
});

test('the page hash is the same on every instruction set this CPU has, and sensitive to every bit', () => {
  const inputs = [Buffer.alloc(PS), Buffer.alloc(PS, 0xff), randomBytes(PS), randomBytes(PS * 4), Buffer.alloc(128, 1)];
  for (const b of inputs) {
    const v = addon.pageHashVariants(b);
    assert.ok(v.length >= 1);
    for (const h of v) assert.equal(h, v[0]);
    assert.equal(addon.pageHash(b), v[0]);
  }
  const page = randomBytes(PS);
  const base = addon.pageHash(page);
  const seen = new Set<bigint>([base]);
  for (let bit = 0; bit < PS * 8; bit += 7) {
    const p = Buffer.from(page);
    p[bit >> 3]! ^= 1 << (bit & 7);
    const h = addon.pageHash(p);
    assert.notEqual(h, base, `flipping bit ${bit} changes the hash`);
    seen.add(h);
  }
  assert.equal(seen.size, 1 + Math.ceil((PS * 8) / 7), 'no two single-bit flips collide');
  // pages that differ only in a counter, as the reference guest's do
  const counters = new Set<bigint>();
  for (let i = 0; i < 20000; i++) {
    const p = Buffer.alloc(PS);
    p.writeUInt32LE(i, 8);
    counters.add(addon.pageHash(p));
  }
  assert.equal(counters.size, 20000);
  assert.throws(() => addon.pageHash(Buffer.alloc(100)), /multiple of 128/);
});

test('the page hash tells sparse pages apart: a word in another block, words that sum alike, a zero guest after many writes', () => {
  const page = (words: [number, bigint][]): Buffer => {
    const b = Buffer.alloc(PS);
    for (const [slot, v] of words) b.writeBigUInt64LE(v, slot * 8);
    return b;
  };
  // the pair that collided under the first definition (found in a zero-content guest's image)
  assert.notEqual(
    addon.pageHash(
      page([
        [96, 16788n],
        [464, 10347n],
      ]),
    ),
    addon.pageHash(page([[432, 27135n]])),
  );
  // the same word in each of the 32 blocks, same lane: 32 different hashes
  const moved = new Set(Array.from({ length: 32 }, (_, blk) => addon.pageHash(page([[blk * 16, 5n]]))));
  assert.equal(moved.size, 32);
  // the reference guest's write stream over an all-zero region: distinct pages, distinct hashes
  const pages = 16384;
  const region = Region.create(pages * PS, { name: 'hash-sparse' });
  try {
    const st = BigUint64Array.of(guestAddon.mix64(1n) | 1n, 0n);
    guestAddon.guestWrite(region.address, region.size, st, 60000, pages, false);
    const byHash = new Map<bigint, number>();
    for (let i = 0; i < pages; i++) {
      const h = addon.pageHash(region.page(i));
      const j = byHash.get(h);
      if (j === undefined) byHash.set(h, i);
      else assert.ok(region.page(j).equals(region.page(i)), `pages ${j} and ${i} differ but share hash ${h.toString(16)}`);
    }
  } finally {
    region.release();
  }
});
