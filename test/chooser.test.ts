/** The encoding chooser's decisions from the figures it is fed (no I/O). */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Chooser } from '../src/encoding/chooser.js';

function fed(savedShare: number, inPlaceRate: number, plainRate: number, linkMBps: number): Chooser {
  const c = new Chooser({ zero: true, dedup: true, compress: true });
  c.sent(4 << 20, (4 << 20) / 1e3 / linkMBps); // one run that filled the socket: the link's rate
  c.inPlace(4096, Math.round(4096 * savedShare), 4096 / inPlaceRate);
  c.plain(4096, 4096 / plainRate);
  return c;
}

test('plain frames are settled only where nothing else can win: a fast link, nothing saved in place, plain faster', () => {
  assert.equal(fed(0, 100, 120, 3000).settledPlain(), true, 'loopback, random pages');
  assert.equal(fed(0.4, 100, 120, 3000).settledPlain(), false, 'in place leaves out 40%: it stays in play');
  assert.equal(fed(0, 250, 120, 3000).settledPlain(), true, 'saving nothing, in place is pure cost whatever its runs measured');
  assert.equal(fed(0.05, 100, 120, 3000).settledPlain(), false, 'in place leaves out 5%: not settled');
  assert.equal(fed(0, 100, 120, 100).settledPlain(), false, 'a link slow enough for compression to matter');
  assert.equal(new Chooser({ zero: true, dedup: true, compress: true }).settledPlain(), false, 'nothing measured yet');
});
