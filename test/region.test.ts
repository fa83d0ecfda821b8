import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { PAGE_SIZE, Region } from '../src/region/region.js';

const MiB = 1 << 20;

function rejects(fn: () => unknown, code: string, message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof LivemigError, `expected a LivemigError, got ${String(e)}`);
    assert.equal(e.code, code);
    assert.match(e.message, message);
    return true;
  });
}

test('create validates the size with exact messages', () => {
  rejects(() => Region.create(0), 'ERR_LIVEMIG_INVALID_ARGUMENT', /size must be a positive integer number of bytes, got 0/);
  rejects(() => Region.create(-4096), 'ERR_LIVEMIG_INVALID_ARGUMENT', /got -4096/);
  rejects(() => Region.create(4096.5), 'ERR_LIVEMIG_INVALID_ARGUMENT', /got 4096.5/);
  rejects(() => Region.create('4096' as unknown as number), 'ERR_LIVEMIG_INVALID_ARGUMENT', /got 4096/);
  rejects(() => Region.create(PAGE_SIZE + 1), 'ERR_LIVEMIG_INVALID_ARGUMENT', new RegExp(`multiple of the page size \\(${PAGE_SIZE}\\)`));
  rejects(() => Region.create(PAGE_SIZE, { name: '' }), 'ERR_LIVEMIG_INVALID_ARGUMENT', /name must be a non-empty string/);
});

test('a region is zero-filled, page-aligned, and its views share memory', () => {
  const r = Region.create(4 * MiB);
  try {
    assert.equal(r.pageSize, PAGE_SIZE);
    assert.equal(r.pageCount, (4 * MiB) / PAGE_SIZE);
    assert.equal(r.address % BigInt(PAGE_SIZE), 0n);
    const all = r.view();
    assert.equal(all.length, 4 * MiB);
    assert.ok(all.every((b) => b === 0));
    r.page(3).fill(0xab);
    assert.equal(all[3 * PAGE_SIZE], 0xab);
    assert.equal(all[4 * PAGE_SIZE], 0);
    assert.equal(r.view(3 * PAGE_SIZE, 8).readUInt8(7), 0xab);
  } finally {
    r.release();
  }
});

test('views and pages outside the region are refused', () => {
  const r = Region.create(PAGE_SIZE * 2);
  try {
    rejects(() => r.page(2), 'ERR_LIVEMIG_INVALID_ARGUMENT', /page index must be an integer in 0\.\.1, got 2/);
    rejects(() => r.page(-1), 'ERR_LIVEMIG_INVALID_ARGUMENT', /got -1/);
    rejects(() => r.view(PAGE_SIZE, PAGE_SIZE + 1), 'ERR_LIVEMIG_INVALID_ARGUMENT', /offset\+length <= 8192/);
    rejects(() => r.view(3 * PAGE_SIZE), 'ERR_LIVEMIG_INVALID_ARGUMENT', /offset must be an integer within the region/);
  } finally {
    r.release();
  }
});

test('using a released region is a clear error, and old views do not crash', () => {
  const r = Region.create(PAGE_SIZE * 4);
  const v = r.view();
  v.fill(7);
  r.release();
  r.release(); // idempotent
  assert.equal(r.released, true);
  rejects(() => r.view(), 'ERR_LIVEMIG_RELEASED', /released/);
  rejects(() => r.fd, 'ERR_LIVEMIG_RELEASED', /released/);
  rejects(() => r.reserve(), 'ERR_LIVEMIG_RELEASED', /released/);
  // the stale view is being switched to scratch memory (in the background): touching it is safe
  v[0] = 1;
  assert.ok(v[1] === 7 || v[1] === 0);
});

test('adopt maps the same memory through a second mapping', () => {
  const a = Region.create(PAGE_SIZE * 8);
  const b = Region.adopt(a.fd, a.size);
  try {
    a.page(5).write('hello');
    assert.equal(b.page(5).toString('utf8', 0, 5), 'hello');
    assert.notEqual(a.address, b.address);
    assert.notEqual(a.fd, b.fd, 'adopt duplicates the descriptor');
  } finally {
    b.release();
    a.release();
  }
});

test('adopt refuses bad descriptors and sizes beyond the file', () => {
  const a = Region.create(PAGE_SIZE * 2);
  try {
    rejects(() => Region.adopt(a.fd, PAGE_SIZE * 4), 'ERR_LIVEMIG_SYSCALL', /fewer than the region's 16384/);
    rejects(() => Region.adopt(-1, PAGE_SIZE), 'ERR_LIVEMIG_INVALID_ARGUMENT', /fd must be a non-negative integer/);
    assert.throws(
      () => Region.adopt(987654, PAGE_SIZE),
      (e: unknown) => e instanceof LivemigError && e.errnoName === 'EBADF' && e.syscall === 'fstat',
    );
  } finally {
    a.release();
  }
});

test('attach reaches the same mapping by share id, and fails clearly once released', () => {
  const a = Region.create(PAGE_SIZE * 2);
  const b = Region.attach(a.shareId);
  assert.equal(b.address, a.address);
  a.page(1)[9] = 42;
  assert.equal(b.page(1)[9], 42);
  const id = a.shareId;
  a.release();
  assert.equal(b.released, true, 'release applies to every handle of the mapping');
  rejects(() => Region.attach(id), 'ERR_LIVEMIG_RELEASED', /no live region has share id/);
});

test('reserving more memory than the host has fails before any page is allocated', () => {
  rejects(() => Region.create(2 ** 44, { reserve: true }), 'ERR_LIVEMIG_NO_MEMORY', /cannot reserve 17592186044416 bytes/);
});
