/** The encoding chooser's decisions from the figures it is fed (no I/O). */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Chooser, FAST_LINK_MBPS, LINK_WINDOW, type LinkFigure } from '../src/encoding/chooser.js';

const all = { zero: true, dedup: true, compress: true };
/** A link that moved `bytes` at `mbps` (MB/s) over `channels`. */
const linkOf = (mbps: number, bytes = LINK_WINDOW, channels = 1): LinkFigure => ({ bytes, ms: bytes / 1e3 / mbps, channels });

/** A chooser that has seen compressible pages shrink to `ratio` at `lz4MBps`. */
function fed(link: LinkFigure | undefined, ratio = 0.5, lz4MBps = 400): Chooser {
  const c = new Chooser(all, () => link);
  c.encoded(4096, 0);
  c.sampled(32, 32);
  c.compressed(1 << 20, (1 << 20) * ratio, (1 << 20) / 1e3 / lz4MBps);
  return c;
}

test('a fast link settles compression off for the whole migration, whatever is measured after', () => {
  let link = linkOf(2 * FAST_LINK_MBPS);
  const c = fed(undefined);
  const d = new Chooser(all, () => link);
  assert.equal(d.compressionOutOfReach(), true, 'loopback: out of reach');
  link = linkOf(50, 4 * LINK_WINDOW); // the link then looks slow: the decision stands
  assert.equal(d.compressionOutOfReach(), true, 'settled, not weighed again');
  assert.equal(d.compressing(), false);
  assert.equal(c.compressing(), false, 'nothing is compressed before the link is measured');
});

test('the link is judged only after LINK_WINDOW bytes: a slow start does not decide anything', () => {
  const early = fed(linkOf(50, LINK_WINDOW / 2));
  assert.equal(early.compressionOutOfReach(), false);
  assert.equal(early.compressing(), false, 'too little measured to compress');
  assert.equal(early.wantSample(), false, 'nor to start sampling');
});

test('on a slow link compressible content is compressed, random content and a poor ratio are not', () => {
  assert.equal(fed(linkOf(117)).compressing(), true, '1 Gbit/s, text-like pages at 0.5');
  assert.equal(fed(linkOf(117), 0.95).compressing(), false, 'a ratio of 0.95 saves too little');
  const random = new Chooser(all, () => linkOf(117));
  random.sampled(32, 0);
  random.compressed(1 << 20, 1 << 20, 1);
  assert.equal(random.compressing(), false, 'nothing looked compressible');
  assert.equal(fed(linkOf(117), 0.5, 60).compressing(), false, 'a compressor slower than the link');
});

test('the link is shared: each channel weighs its share against its own compressor', () => {
  // 500 MB/s over 4 channels is 125 a channel: compressing at 400 MB/s a channel pays
  assert.equal(fed(linkOf(500, LINK_WINDOW, 4)).compressing(), true);
  assert.equal(fed(linkOf(500, LINK_WINDOW, 1), 0.5, 400).compressing(), false, 'one channel of 500 MB/s: the compressor is the bottleneck');
});

test('with compression off the chooser never compresses, whatever the link', () => {
  const c = new Chooser({ zero: true, dedup: true, compress: false }, () => linkOf(10));
  assert.equal(c.compressionOutOfReach(), true);
  assert.equal(c.compressing(), false);
});
