import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { addon } from '../src/native.js';
import { GuestListener, parseHello } from '../src/region/handover.js';
import { PAGE_SIZE, Region } from '../src/region/region.js';
import { abstractSocket } from './helpers.js';

const good = { version: 1, pid: 42, address: String(PAGE_SIZE * 1000), size: PAGE_SIZE * 4, pageSize: PAGE_SIZE, tracking: 'none' };
const hello = (o: object): Buffer => Buffer.from(JSON.stringify({ ...good, ...o }));

test('a guest hello is checked field by field', () => {
  assert.equal(parseHello(hello({})).size, PAGE_SIZE * 4);
  const cases: [Buffer, RegExp][] = [
    [Buffer.from('{not json'), /not JSON/],
    [hello({ version: 2 }), /version 2 is not 1/],
    [hello({ pid: -1 }), /pid -1 is not a positive integer/],
    [hello({ pageSize: 65536 }), /page size 65536 is not this host's/],
    [hello({ size: PAGE_SIZE + 1 }), /is not a positive multiple/],
    [hello({ size: 0 }), /size 0/],
    [hello({ address: '4097' }), /not page-aligned/],
    [hello({ address: '-4096' }), /not a decimal string/],
    [hello({ address: '99999999999999999999' }), /not page-aligned/],
    [hello({ tracking: 'magic' }), /tracking magic is unknown/],
    [hello({ info: 5 }), /info is not an object/],
    [hello({ control: 'slow' }), /control slow is unknown/],
  ];
  for (const [data, re] of cases) {
    assert.throws(() => parseHello(data), (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_HANDOVER' && re.test(e.message), re.source);
  }
});

function rawSend(path: string, data: Buffer, fds: number[]): number {
  const fd = addon.unixConnect(path);
  addon.sendWithFds(fd, data, fds);
  return fd;
}

test('a handover without exactly one descriptor is refused and leaks nothing', async () => {
  const l = GuestListener.listen(abstractSocket('fds'));
  const r = Region.create(PAGE_SIZE * 4);
  const openFds = (): number => readdirSync('/proc/self/fd').length;
  try {
    const before = openFds();
    const c1 = rawSend(l.path, hello({}), []);
    await assert.rejects(l.accept(2000), /expected one descriptor \(the memfd\), got 0/);
    const c2 = rawSend(l.path, hello({}), [r.fd, r.fd]);
    await assert.rejects(l.accept(2000), /got 2/);
    const c3 = rawSend(l.path, hello({ version: 9 }), [r.fd]);
    await assert.rejects(l.accept(2000), /version 9/);
    const c4 = rawSend(l.path, hello({ control: 'fast' }), [r.fd]);
    await assert.rejects(l.accept(2000), /expected two descriptors \(the memfd, the control socket\), got 1/);
    for (const c of [c1, c2, c3, c4]) addon.closeFd(c);
    assert.equal(openFds(), before, 'every received descriptor was closed');
  } finally {
    l.close();
    r.release();
  }
});

test('a good handover adopts the memfd and opens a message socket', async () => {
  const l = GuestListener.listen(abstractSocket('ok'));
  const r = Region.create(PAGE_SIZE * 4);
  try {
    r.page(2).write('guest');
    const c = rawSend(l.path, hello({ pid: process.pid, address: r.address.toString(), tracking: 'none' }), [r.fd]);
    const conn = await l.accept(2000);
    assert.equal(conn.region.page(2).toString('utf8', 0, 5), 'guest');
    assert.equal(conn.address, r.address);
    assert.equal(conn.controlFd, -1, 'no control socket was offered');
    conn.socket.destroy();
    conn.region.release();
    addon.closeFd(c);
  } finally {
    l.close();
    r.release();
  }
});

test('accept times out with ERR_LIVEMIG_TIMEOUT', async () => {
  const l = GuestListener.listen(abstractSocket('timeout'));
  try {
    await assert.rejects(l.accept(50), (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_TIMEOUT');
  } finally {
    l.close();
  }
});
