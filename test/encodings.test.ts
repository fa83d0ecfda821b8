/**
 * Page encodings (PAGES_ENC): each encoding written by the reference encoder lands in the
 * region through the native receiver, and every malformed page is refused with its error.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { compressSync } from 'lz4-napi';
import { LivemigError } from '../src/errors.js';
import { addon } from '../src/native.js';
import { guestAddon } from '../src/workload/guest-addon.js';
import { FramedConnection } from '../src/protocol/connection.js';
import * as M from '../src/protocol/messages.js';
import * as R from './reference/frames.js';
import * as F from '../src/protocol/format.js';
import { Region } from '../src/region/region.js';
import { tcpPair } from './helpers.js';

const PS = 4096;
const V = 2;

async function receiverWith(stream: Buffer, pages = 16): Promise<{ region: Region; hashes: BigUint64Array; result: Promise<unknown>; close: () => void }> {
  const { client, peer, server } = await tcpPair();
  peer.resume();
  const wire = FramedConnection.fromSocket(client);
  const region = Region.create(pages * PS, { name: 'enc-test' });
  const hashes = new BigUint64Array(pages).fill(addon.zeroPageHash());
  peer.write(stream);
  const result = wire.next(undefined, { region, hashes, version: V, encodings: true });
  result.catch(() => undefined);
  return { region, hashes, result, close: () => (wire.close(), peer.destroy(), server.close()) };
}

/** a dup's body: the content hash, then the page holding it */
const dupBody = (content: Buffer | bigint, page: number): Buffer => {
  const b = Buffer.alloc(12);
  b.writeBigUInt64LE(typeof content === 'bigint' ? content : addon.pageHash(content), 0);
  b.writeUInt32LE(page, 8);
  return b;
};

const text = (): Buffer => Buffer.from('the quick brown fox jumps over the lazy dog '.repeat(100).slice(0, PS));

test('raw, zero, dup and lz4 pages each arrive intact, and a dup may refer to a page of the same batch', async () => {
  const a = randomBytes(PS);
  const t = text();
  const frame = R.encodePagesEnc(
    1,
    [
      { index: 1, encoding: F.PageEncoding.Raw, body: a },
      { index: 2, encoding: F.PageEncoding.Zero, body: Buffer.alloc(0) },
      { index: 3, encoding: F.PageEncoding.Dup, body: dupBody(a, 1) },
      { index: 4, encoding: F.PageEncoding.Lz4, body: compressSync(t) },
    ],
    V,
  );
  const r = await receiverWith(Buffer.concat([frame, M.encodeRoundEnd({ round: 1, pages: 4 }, V)]));
  const f = (await r.result) as { type: F.FrameType; pages: number };
  assert.equal(f.type, F.FrameType.RoundEnd);
  assert.equal(f.pages, 4);
  assert.ok(r.region.page(1).equals(a));
  assert.ok(r.region.page(2).equals(Buffer.alloc(PS)));
  assert.ok(r.region.page(3).equals(a), 'dup copied from page 1');
  assert.ok(r.region.page(4).equals(t), 'lz4 decoded');
  for (const p of [1, 3]) assert.equal(r.hashes[p], addon.pageHash(a));
  assert.equal(r.hashes[4], addon.pageHash(t));
  r.close();
  r.region.release();
});

test('a forged dup reference, a corrupt lz4 page and a wrong decompressed size are refused', async () => {
  const t = text();
  const good = compressSync(t);
  // a sequence with no literals whose match refers to offset 0: structurally impossible
  const corrupt = Buffer.concat([good.subarray(0, 4), Buffer.from([0x0f, 0x00, 0x00, 0x00])]);
  const wrongSize = Buffer.from(good);
  wrongSize.writeUInt32LE(PS / 2, 0);
  const cases: [string, R.EncodedPage, RegExp][] = [
    [
      'forged dup',
      { index: 0, encoding: F.PageEncoding.Dup, body: dupBody(0x1234n, 1) },
      /dup reference to content 0000000000001234 in page 1, which this receiver does not hold there/,
    ],
    [
      'dup from outside the region',
      { index: 0, encoding: F.PageEncoding.Dup, body: dupBody(addon.zeroPageHash(), 1 << 30) },
      /in page 1073741824, which this receiver does not hold/,
    ],
    ['corrupt lz4', { index: 0, encoding: F.PageEncoding.Lz4, body: corrupt }, /corrupt lz4 page 0/],
    ['wrong size', { index: 0, encoding: F.PageEncoding.Lz4, body: wrongSize }, /decompresses to 2048 bytes/],
    ['truncated lz4', { index: 0, encoding: F.PageEncoding.Lz4, body: good.subarray(0, good.length - 5) }, /corrupt lz4/],
  ];
  for (const [name, page, re] of cases) {
    // a ROUND_END follows, so a page that slipped through ends the read instead of hanging it
    const r = await receiverWith(Buffer.concat([R.encodePagesEnc(1, [page], V), M.encodeRoundEnd({ round: 1, pages: 1 }, V)]));
    await assert.rejects(
      r.result,
      (e: unknown) => e instanceof LivemigError && (e.code === 'ERR_LIVEMIG_PROTOCOL' || e.code === 'ERR_LIVEMIG_PAGE_INDEX') && re.test(e.message),
      name,
    );
    r.close();
    r.region.release();
  }
  // an unknown encoding byte
  const bad = R.encodePagesEnc(1, [{ index: 0, encoding: F.PageEncoding.Zero, body: Buffer.alloc(0) }], V);
  bad[12 + 8 + 4] = 9;
  const r = await receiverWith(Buffer.concat([bad, M.encodeRoundEnd({ round: 1, pages: 1 }, V)]));
  await assert.rejects(r.result, /unknown page encoding 9/);
  r.close();
  r.region.release();
});

test('an lz4 block may cover a page and up to three continuation pages after it; a continuation without its block is refused', async () => {
  const t = text();
  const u = Buffer.from(t).reverse();
  const w = Buffer.alloc(PS, 0x41);
  const block = compressSync(Buffer.concat([t, u, w]));
  const frame = R.encodePagesEnc(
    1,
    [
      { index: 3, encoding: F.PageEncoding.Lz4, body: block },
      { index: 7, encoding: F.PageEncoding.Lz4Cont, body: Buffer.alloc(0) },
      { index: 9, encoding: F.PageEncoding.Lz4Cont, body: Buffer.alloc(0) },
      { index: 12, encoding: F.PageEncoding.Dup, body: dupBody(u, 7) },
    ],
    V,
  );
  const r = await receiverWith(Buffer.concat([frame, M.encodeRoundEnd({ round: 1, pages: 4 }, V)]));
  const f = (await r.result) as { type: F.FrameType; pages: number };
  assert.equal(f.type, F.FrameType.RoundEnd);
  assert.ok(r.region.page(3).equals(t) && r.region.page(7).equals(u) && r.region.page(9).equals(w), 'the block lands on its three pages');
  assert.ok(r.region.page(12).equals(u), 'a later dup may name a page of the block');
  for (const [p, c] of [
    [3, t],
    [7, u],
    [9, w],
  ] as const)
    assert.equal(r.hashes[p], addon.pageHash(c));
  r.close();
  r.region.release();
  const cont: R.EncodedPage = { index: 2, encoding: F.PageEncoding.Lz4Cont, body: Buffer.alloc(0) };
  const cases: [string, R.EncodedPage[], RegExp][] = [
    ['alone', [cont], /continuation page 2 without an lz4 block/],
    ['after raw', [{ index: 1, encoding: F.PageEncoding.Raw, body: t }, cont], /continuation page 2 without an lz4 block/],
    ['block of 3 pages with one continuation', [{ index: 1, encoding: F.PageEncoding.Lz4, body: block }, cont], /decompresses to 12288 bytes, not 2 page/],
    ['one page with a continuation', [{ index: 1, encoding: F.PageEncoding.Lz4, body: compressSync(t) }, cont], /decompresses to 4096 bytes, not 2 page/],
    [
      'five pages in a block',
      [
        { index: 1, encoding: F.PageEncoding.Lz4, body: compressSync(Buffer.concat([t, t, t, t, t])) },
        ...[2, 3, 4, 5].map((i) => ({ index: i, encoding: F.PageEncoding.Lz4Cont, body: Buffer.alloc(0) })),
      ],
      /continuation page 5 without an lz4 block of at most 4 pages/,
    ],
  ];
  for (const [name, pages, re] of cases) {
    const rr = await receiverWith(Buffer.concat([R.encodePagesEnc(1, pages, V), M.encodeRoundEnd({ round: 1, pages: pages.length }, V)]));
    await assert.rejects(rr.result, (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_PROTOCOL' && re.test(e.message), name);
    rr.close();
    rr.region.release();
  }
  // encoding 4 (removed before release) is unknown
  const bad = R.encodePagesEnc(1, [{ index: 0, encoding: F.PageEncoding.Zero, body: Buffer.alloc(0) }], V);
  bad[12 + 8 + 4] = 4;
  const r4 = await receiverWith(Buffer.concat([bad, M.encodeRoundEnd({ round: 1, pages: 1 }, V)]));
  await assert.rejects(r4.result, /unknown page encoding 4/);
  r4.close();
  r4.region.release();
});

test('the native LZ4 decoder agrees with lz4-napi and rejects every truncation', () => {
  for (const page of [text(), Buffer.alloc(PS, 7), Buffer.concat([randomBytes(PS / 2), Buffer.alloc(PS / 2)])]) {
    const c = compressSync(page);
    const out = addon.lz4DecodePage(c.subarray(4), PS);
    assert.ok(out && out.equals(page));
    for (let cut = 1; cut < c.length - 4; cut += 3) assert.equal(addon.lz4DecodePage(c.subarray(4, c.length - cut), PS), null, `cut ${cut}`);
  }
});

test('a dup is checked against what the receiver holds in the named page; content it no longer holds is refused', async () => {
  const a = randomBytes(PS);
  const b = randomBytes(PS);
  const ok = R.encodePagesEnc(
    1,
    [
      { index: 5, encoding: F.PageEncoding.Raw, body: a },
      { index: 6, encoding: F.PageEncoding.Raw, body: b },
      { index: 7, encoding: F.PageEncoding.Zero, body: Buffer.alloc(0) },
      { index: 8, encoding: F.PageEncoding.Dup, body: dupBody(b, 6) },
    ],
    V,
  );
  const r = await receiverWith(Buffer.concat([ok, M.encodeRoundEnd({ round: 1, pages: 4 }, V)]));
  await r.result;
  assert.ok(r.region.page(5).equals(a) && r.region.page(6).equals(b) && r.region.page(8).equals(b));
  assert.equal(r.hashes[5], addon.pageHash(a), 'raw pages are hashed for the digest');
  r.close();
  r.region.release();
  const overwritten = Buffer.concat([
    R.encodePagesEnc(1, [{ index: 5, encoding: F.PageEncoding.Raw, body: a }], V),
    R.encodePagesEnc(
      1,
      [
        { index: 5, encoding: F.PageEncoding.Raw, body: b },
        { index: 9, encoding: F.PageEncoding.Dup, body: dupBody(a, 5) },
      ],
      V,
    ),
  ]);
  const r2 = await receiverWith(Buffer.concat([overwritten, M.encodeRoundEnd({ round: 1, pages: 3 }, V)]));
  await assert.rejects(r2.result, /dup reference to content [0-9a-f]+ in page 5, which this receiver does not hold there/);
  r2.close();
  r2.region.release();
});

test('frame rules: a page listed twice, a dup of a page written later in the frame, and bodies of the wrong size are refused', async () => {
  const a = randomBytes(PS);
  const h = dupBody(addon.zeroPageHash(), 5);
  const cases: [string, Buffer, RegExp][] = [
    [
      'twice',
      R.encodePagesEnc(
        1,
        [
          { index: 2, encoding: F.PageEncoding.Raw, body: a },
          { index: 2, encoding: F.PageEncoding.Zero, body: Buffer.alloc(0) },
        ],
        V,
      ),
      /page index 2 follows 2: .*strictly increasing/,
    ],
    // page 5 holds `a` until the raw page later in this frame replaces it
    [
      'dup of a later page',
      Buffer.concat([
        R.encodePagesEnc(1, [{ index: 5, encoding: F.PageEncoding.Raw, body: a }], V),
        R.encodePagesEnc(
          1,
          [
            { index: 3, encoding: F.PageEncoding.Dup, body: dupBody(a, 5) },
            { index: 5, encoding: F.PageEncoding.Raw, body: randomBytes(PS) },
          ],
          V,
        ),
      ]),
      /in page 5, which this frame writes later/,
    ],
    [
      'short body',
      R.encodePagesEnc(
        1,
        [
          { index: 1, encoding: F.PageEncoding.Raw, body: a.subarray(0, PS - 8) },
          { index: 2, encoding: F.PageEncoding.Dup, body: h },
        ],
        V,
      ),
      /bodies of 2 pages must be 4108 bytes/,
    ],
  ];
  for (const [name, frame, re] of cases) {
    const r = await receiverWith(Buffer.concat([frame, M.encodeRoundEnd({ round: 1, pages: 1 }, V)]));
    await assert.rejects(
      r.result,
      (e: unknown) => e instanceof LivemigError && (e.code === 'ERR_LIVEMIG_PROTOCOL' || e.code === 'ERR_LIVEMIG_PAGE_INDEX') && re.test(e.message),
      name,
    );
    r.close();
    r.region.release();
  }
});

test('in-place encoded sends: zero pages of a fresh receiver are left out, repeats go as dups once their source went, and the copy is exact', async () => {
  const pages = 64;
  const { client, peer, server } = await tcpPair();
  const tx = FramedConnection.fromSocket(client);
  const rx = FramedConnection.fromSocket(peer);
  const src = Region.create(pages * PS, { name: 'enc-src' });
  const dst = Region.create(pages * PS, { name: 'enc-dst' });
  const shared = randomBytes(PS);
  let expectZero = 0;
  let expectDup = -1; // the first copy of `shared` goes raw
  for (let i = 0; i < pages; i++) {
    if (i % 4 === 0) expectZero++;
    else if (i % 4 === 1) {
      src.page(i).set(shared);
      expectDup++;
    } else src.page(i).set(randomBytes(PS));
  }
  const zeroHashes = (): BigUint64Array => new BigUint64Array(pages).fill(addon.zeroPageHash());
  const all = Uint32Array.from({ length: pages }, (_, i) => i);
  const txHashes = new BigUint64Array(pages);
  // each time into a fresh receiver: the second after a page changed, as a guest's write would
  for (const round of [1, 2]) {
    if (round === 2) src.page(2).set(randomBytes(PS));
    dst.view().fill(0);
    const txDedup = new addon.Dedup(pages);
    txDedup.initImage(zeroHashes());
    const rxHashes = zeroHashes();
    const got = rx.next(undefined, { region: dst, hashes: rxHashes, version: V, encodings: true });
    const c = await tx.sendPages({ region: src, pages: all, round, version: V, batchPages: 16, hashes: txHashes, dedup: txDedup, flags: 3 });
    await tx.send(M.encodeRoundEnd({ round, pages }, V));
    const f = (await got) as { type: F.FrameType; pages: number; bytes: number };
    assert.equal(f.type, F.FrameType.RoundEnd);
    assert.equal(f.bytes, c.bytes);
    // a raw page becomes a source once its frame went: copies in that first frame of 16 go raw too
    const dups = expectDup - 3;
    assert.deepEqual(
      { zero: c.zero, skipped: c.skipped, dup: c.dup, raw: c.raw },
      { zero: expectZero, skipped: 0, dup: dups, raw: pages - expectZero - dups },
      `round ${round}`,
    );
    assert.ok(dst.view().equals(src.view()), `round ${round}: destination equals source`);
    assert.deepEqual([...rxHashes], [...txHashes], `round ${round}: both sides hold the same page hashes`);
  }
  tx.close();
  rx.close();
  server.close();
  src.release();
  dst.release();
});

test('migrating back to a kept image sends only the pages that changed, and the copy is exact', async () => {
  const { migrate } = await import('../src/source/migrate.js');
  const { listen } = await import('../src/receiver/listen.js');
  const { writeFile, rm } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const path = await import('node:path');
  const pages = 512;
  const src = Region.create(pages * PS, { name: 'reuse-src' });
  await guestAddon.contentFill(src.address, src.size, 4, 7n); // mixed
  const image = path.join(tmpdir(), `livemig-reuse-${process.pid}.img`);
  await writeFile(image, src.view()); // what the destination kept when the guest left
  const changed = [3, 50, 51, 200, 201, 202, 333, 400, 401, 511];
  for (const p of changed) src.page(p).set(randomBytes(PS));
  let received: Buffer | undefined;
  const rx = await listen('127.0.0.1', 0, { reuseImage: image, activate: async (region) => void (received = Buffer.from(region.view())) });
  try {
    const report = await migrate({
      region: src,
      to: { host: '127.0.0.1', port: rx.port },
      pause: async () => new Uint8Array(0),
      resume: async () => undefined,
    });
    await rx.next();
    assert.equal(report.verified, true);
    assert.ok(received!.equals(src.view()), 'destination equals source');
    // (its zero pages count as zero pages: the destination holds them as zero)
    assert.equal(report.skipped_pages + report.zero_pages, pages - changed.length, 'every unchanged page is left out');
    assert.ok(report.skipped_pages > 0, 'the kept nonzero pages are skipped');
    assert.ok(report.wire_bytes < (changed.length + 4) * PS + 16 * 1024, `sent ${report.wire_bytes} bytes for ${changed.length} changed pages`);
  } finally {
    await rx.close();
    src.release();
    await rm(image, { force: true });
  }
});
