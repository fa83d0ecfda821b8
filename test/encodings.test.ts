/**
 * Page encodings (PAGES_ENC): each encoding written by the reference encoder lands in the
 * region through the native receiver, and every malformed page is refused with its error.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { once } from 'node:events';
import { test } from 'node:test';
import { compressSync } from 'lz4-napi';
import { LivemigError } from '../src/errors.js';
import { addon } from '../src/native.js';
import { FrameType } from '../src/protocol/frame.js';
import * as M from '../src/protocol/messages.js';
import { WireChannel } from '../src/protocol/wire.js';
import { Region } from '../src/region/region.js';

const PS = 4096;
const V = 2;

async function receiverWith(stream: Buffer, pages = 16): Promise<{ region: Region; hashes: BigUint64Array; result: Promise<unknown>; close: () => void }> {
  const server = net.createServer({ pauseOnConnect: true });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const accepted = once(server, 'connection');
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'connect');
  const [peer] = (await accepted) as [net.Socket];
  peer.resume();
  const wire = WireChannel.fromSocket(client);
  const region = Region.create(pages * PS, { name: 'enc-test' });
  const hashes = new BigUint64Array(pages).fill(addon.zeroPageHash());
  const dedup = new addon.Dedup(pages);
  dedup.initImage(hashes);
  peer.write(stream);
  const result = wire.next(undefined, { region, hashes, version: V, dedup });
  result.catch(() => undefined);
  return { region, hashes, result, close: () => (wire.close(), peer.destroy(), server.close()) };
}

const text = (): Buffer => Buffer.from('the quick brown fox jumps over the lazy dog '.repeat(100).slice(0, PS));

test('raw, zero, dup and lz4 pages each arrive intact, and a dup may refer to a page of the same batch', async () => {
  const a = randomBytes(PS);
  const t = text();
  const frame = M.encodePagesEnc(
    1,
    [
      { index: 1, encoding: M.PageEncoding.Raw, body: a },
      { index: 2, encoding: M.PageEncoding.Zero, body: Buffer.alloc(0) },
      { index: 3, encoding: M.PageEncoding.Dup, body: Buffer.from(new BigUint64Array([addon.pageHash(a)]).buffer) },
      { index: 4, encoding: M.PageEncoding.Lz4, body: compressSync(t) },
    ],
    V,
  );
  const r = await receiverWith(Buffer.concat([frame, M.encodeRoundEnd({ round: 1, pages: 4 }, V)]));
  const f = (await r.result) as { type: FrameType; pages: number };
  assert.equal(f.type, FrameType.RoundEnd);
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
  const cases: [string, M.EncodedPage, RegExp][] = [
    ['forged dup', { index: 0, encoding: M.PageEncoding.Dup, body: Buffer.from(new BigUint64Array([0x1234n]).buffer) }, /dup reference to content 0000000000001234/],
    ['corrupt lz4', { index: 0, encoding: M.PageEncoding.Lz4, body: corrupt }, /corrupt lz4 page 0/],
    ['wrong size', { index: 0, encoding: M.PageEncoding.Lz4, body: wrongSize }, /decompresses to 2048 bytes/],
    ['truncated lz4', { index: 0, encoding: M.PageEncoding.Lz4, body: good.subarray(0, good.length - 5) }, /corrupt lz4/],
  ];
  for (const [name, page, re] of cases) {
    // a ROUND_END follows, so a page that slipped through ends the read instead of hanging it
    const r = await receiverWith(Buffer.concat([M.encodePagesEnc(1, [page], V), M.encodeRoundEnd({ round: 1, pages: 1 }, V)]));
    await assert.rejects(r.result, (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_PROTOCOL' && re.test(e.message), name);
    r.close();
    r.region.release();
  }
  // an unknown encoding byte
  const bad = M.encodePagesEnc(1, [{ index: 0, encoding: M.PageEncoding.Zero, body: Buffer.alloc(0) }], V);
  bad[12 + 8 + 4] = 9;
  const r = await receiverWith(Buffer.concat([bad, M.encodeRoundEnd({ round: 1, pages: 1 }, V)]));
  await assert.rejects(r.result, /unknown page encoding 9/);
  r.close();
  r.region.release();
});

test('the native LZ4 decoder agrees with lz4-napi and rejects every truncation', () => {
  for (const page of [text(), Buffer.alloc(PS, 7), Buffer.concat([randomBytes(PS / 2), Buffer.alloc(PS / 2)])]) {
    const c = compressSync(page);
    const out = addon.lz4DecodePage(c.subarray(4), PS);
    assert.ok(out && out.equals(page));
    for (let cut = 1; cut < c.length - 4; cut += 3) assert.equal(addon.lz4DecodePage(c.subarray(4, c.length - cut), PS), null, `cut ${cut}`);
  }
});
