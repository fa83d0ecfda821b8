/**
 * Migrations over authenticated connections: a pre-copy migration with certificates and one
 * with a pre-shared key report who the peer was; a source the destination cannot authenticate
 * is refused before anything is reserved, and its guest was never paused.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import type { Credentials } from '../src/security/tls.js';
import { migrate } from '../src/source/migrate.js';
import type { MigrationReport } from '../src/source/types.js';
import type { ReceiveReport } from '../src/receiver/receiver.js';
import { makeCa, opensslMissing } from './certs.js';

interface Outcome {
  report?: MigrationReport;
  error?: LivemigError;
  received: ReceiveReport | LivemigError;
  reserved: number;
  paused: number;
}

async function migrateWith(client: Credentials | undefined, server: Credentials): Promise<Outcome> {
  const region = Region.create(512 * 4096, { name: 'tls-src' });
  for (let p = 0; p < region.pageCount; p++) region.page(p).fill(p & 255);
  let reserved = 0;
  let paused = 0;
  const rx = await listen('127.0.0.1', 0, { credentials: server, onReserved: () => void reserved++, activate: async () => undefined });
  const received = rx.next();
  received.catch(() => undefined);
  try {
    const report = await migrate({
      region,
      to: { host: '127.0.0.1', port: rx.port },
      ...(client ? { credentials: client } : {}),
      pause: async () => (paused++, new Uint8Array(8)),
      resume: async () => undefined,
    });
    return { report, received: await received, reserved, paused };
  } catch (e) {
    return { error: e as LivemigError, received: await received.catch((e2: unknown) => e2 as LivemigError), reserved, paused };
  } finally {
    await rx.close();
    region.release();
  }
}

test('a pre-copy migration with certificates: verified, and each side names the other', { skip: opensslMissing }, async () => {
  const { ca, certs } = makeCa(['src', 'dst']);
  const r = await migrateWith({ kind: 'cert', ...certs['src']!, ca, peerName: 'dst' }, { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] });
  assert.ok(r.report, String(r.error));
  assert.equal(r.report.verified, true);
  assert.deepEqual(r.report.security, { auth: 'tls-cert', peer: 'dst', cipher: r.report.security.cipher, encrypted: true });
  assert.match(r.report.security.cipher ?? '', /^TLS_/);
  assert.equal((r.received as ReceiveReport).security.peer, 'src');
});

test('a pre-copy migration with a pre-shared key; without credentials the report says none', async () => {
  const key = Buffer.alloc(32, 3);
  const r = await migrateWith({ kind: 'psk', identity: 'src', key }, { kind: 'psk', identity: 'src', key });
  assert.ok(r.report, String(r.error));
  assert.deepEqual([r.report.security.auth, r.report.security.peer], ['tls-psk', 'src']);
  const region = Region.create(16 * 4096, { name: 'plain-src' });
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined });
  try {
    const plain = await migrate({ region, to: { host: '127.0.0.1', port: rx.port }, pause: async () => new Uint8Array(0), resume: async () => undefined });
    assert.deepEqual(plain.security, { auth: 'none', peer: null, cipher: null, encrypted: false });
    await rx.next();
  } finally {
    await rx.close();
    region.release();
  }
});

test(
  'a source the destination cannot authenticate is refused before anything is reserved, and its guest was never paused',
  { skip: opensslMissing },
  async () => {
    const { ca, certs } = makeCa(['src', 'dst', 'mallory']);
    const r = await migrateWith({ kind: 'cert', ...certs['mallory']!, ca, peerName: 'dst' }, { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] });
    assert.ok(r.error, 'the migration fails');
    assert.equal(r.error.code, 'ERR_LIVEMIG_AUTH', r.error.message);
    assert.equal((r.received as LivemigError).code, 'ERR_LIVEMIG_AUTH');
    assert.match((r.received as LivemigError).message, /names 'mallory', which --allow does not admit/);
    assert.equal(r.reserved, 0, 'nothing was reserved');
    assert.equal(r.paused, 0, 'the guest was never paused');
    const psk = await migrateWith({ kind: 'psk', identity: 'src', key: Buffer.alloc(32, 1) }, { kind: 'psk', identity: 'src', key: Buffer.alloc(32, 2) });
    assert.equal(psk.error?.code, 'ERR_LIVEMIG_AUTH', 'a wrong pre-shared key is refused');
    assert.equal(psk.reserved, 0);
    // a certificate from another CA
    const other = makeCa(['src']);
    const foreign = await migrateWith({ kind: 'cert', ...other.certs['src']!, ca, peerName: 'dst' }, { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] });
    assert.ok(foreign.error, 'a certificate from an unknown CA fails the migration');
    assert.match((foreign.received as LivemigError).message, /not trusted/);
    assert.deepEqual([foreign.reserved, foreign.paused], [0, 0], 'unknown CA: nothing reserved, never paused');
    // no credentials at all: the destination reads HELLO as a broken TLS handshake
    const none = await migrateWith(undefined, { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] });
    assert.ok(none.error, 'a source without credentials fails');
    assert.equal((none.received as LivemigError).code, 'ERR_LIVEMIG_AUTH');
    assert.deepEqual([none.reserved, none.paused], [0, 0], 'no credentials: nothing reserved, never paused');
  },
);

test('a destination that is not the one the source expects is refused before any page leaves', { skip: opensslMissing }, async () => {
  const { ca, certs } = makeCa(['src', 'dst', 'mallory']);
  // mallory has a certificate from the same CA, but the source asked for 'dst'
  const r = await migrateWith({ kind: 'cert', ...certs['src']!, ca, peerName: 'dst' }, { kind: 'cert', ...certs['mallory']!, ca, allow: ['src'] });
  assert.equal(r.error?.code, 'ERR_LIVEMIG_AUTH', String(r.error));
  assert.match(r.error!.message, /destination could not be authenticated|not trusted/);
  assert.deepEqual([r.reserved, r.paused], [0, 0], 'no page left: nothing was reserved and the guest never paused');
});

test('secure by default: off loopback without credentials, listen() and migrate() refuse unless insecure is asked for', async () => {
  await assert.rejects(
    listen('0.0.0.0', 0, { activate: async () => undefined }),
    (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_INSECURE' && /--insecure/.test(e.message),
  );
  const rx = await listen('0.0.0.0', 0, { activate: async () => undefined, insecure: true });
  await rx.close();
  const region = Region.create(16 * 4096, { name: 'insecure-src' });
  let paused = 0;
  try {
    await assert.rejects(
      migrate({ region, to: { host: '10.11.12.13', port: 7878 }, pause: async () => (paused++, new Uint8Array(0)), resume: async () => undefined }),
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_INSECURE' && e.phase === 'validate',
    );
    assert.equal(paused, 0);
  } finally {
    region.release();
  }
});
