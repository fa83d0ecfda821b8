import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import xxhash from 'xxhash-wasm';
import { xxh64 } from '../src/pages/hash.js';

test('native XXH64 matches the reference vectors', () => {
  assert.equal(xxh64(Buffer.alloc(0)), 0xef46db3751d8e999n);
  assert.equal(xxh64(Buffer.from('a')), 0xd24ec4f1a98c6e5bn);
  assert.equal(xxh64(Buffer.from('abc')), 0x44bc2cf5ad770999n);
});

test('native XXH64 equals xxhash-wasm h64 for every length and seed tried', async () => {
  const { h64Raw } = await xxhash();
  for (const len of [1, 3, 4, 7, 8, 15, 31, 32, 33, 63, 64, 100, 4095, 4096, 65536]) {
    const data = randomBytes(len);
    for (const seed of [0n, 1n, 0xffffffffffffffffn]) {
      assert.equal(xxh64(data, seed), h64Raw(data, seed), `length ${len} seed ${seed}`);
    }
  }
});
