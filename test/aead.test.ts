/**
 * The native AEAD records (native/io/aead.h) against Node's own AES-256-GCM: the same bytes for
 * the same key and nonce, a nonce that advances per record, and a record that was altered, is
 * out of order or under another key refused with ERR_LIVEMIG_AUTH.
 */
import assert from 'node:assert/strict';
import { createCipheriv, randomBytes } from 'node:crypto';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { addon, call } from '../src/native.js';

const nonce = (salt: Buffer, seq: number): Buffer => {
  const iv = Buffer.alloc(12);
  salt.copy(iv, 0);
  iv.writeBigUInt64BE(BigInt(seq), 4);
  return iv;
};

function nodeSeal(key: Buffer, salt: Buffer, seq: number, plain: Buffer): Buffer {
  const c = createCipheriv('aes-256-gcm', key, nonce(salt, seq));
  const body = Buffer.concat([c.update(plain), c.final()]);
  return Buffer.concat([body, c.getAuthTag()]);
}

const open = (key: Buffer, salt: Buffer, sealed: Buffer[]): Buffer[] =>
  call('ERR_LIVEMIG_AUTH', 'transport', 'opening records', () => addon.aeadOpen(key, salt, sealed));
const refused = (e: unknown): boolean => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_AUTH' && /failed authentication/.test(e.message);

test("sealed records are Node's AES-256-GCM with the nonce salt || big-endian record counter, and open again", () => {
  const key = randomBytes(32);
  const salt = randomBytes(4);
  const records = [randomBytes(4096), Buffer.alloc(4096), randomBytes(1), randomBytes(256 << 10), Buffer.alloc(4096)];
  const sealed = addon.aeadSeal(key, salt, records);
  sealed.forEach((s, i) => assert.ok(s.equals(nodeSeal(key, salt, i, records[i]!)), `record ${i} matches node:crypto`));
  assert.ok(!sealed[1]!.equals(sealed[4]!), 'the same plaintext twice seals differently: the nonce advanced');
  open(key, salt, sealed).forEach((p, i) => assert.ok(p.equals(records[i]!), `record ${i} opens to its plaintext`));
});

test('an altered record, a record out of order and another key are refused with ERR_LIVEMIG_AUTH', () => {
  const key = randomBytes(32);
  const salt = randomBytes(4);
  const records = [randomBytes(8192), randomBytes(8192)];
  const sealed = addon.aeadSeal(key, salt, records);
  for (const at of [0, 4095, 8191, 8192 + 15]) {
    const bad = sealed.map((s) => Buffer.from(s));
    bad[0]![at]! ^= 0x01; // one bit, in the body or in the tag
    assert.throws(() => open(key, salt, bad), refused, `a bit flipped at ${at}`);
  }
  assert.throws(() => open(key, salt, [sealed[1]!, sealed[0]!]), refused, 'records swapped');
  assert.throws(() => open(randomBytes(32), salt, sealed), refused, 'another key');
  assert.throws(() => open(key, Buffer.from([salt[0]! ^ 1, salt[1]!, salt[2]!, salt[3]!]), sealed), refused, 'another salt');
});
