/**
 * Version 3's commit: the destination proves it holds the image (DIGEST, its own digest, sent
 * before the source has said what its digest is). An impostor that skips the proof or sends a
 * wrong one cannot make the source release its guest: the guest resumes on the source. With
 * credentials, an older peer (whose commit is not proven) is refused.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { CAP_COMMIT_ACTIVATE, FrameType } from '../src/protocol/format.js';
import {
  decodeError,
  encodeAccept,
  encodeActivated,
  encodeCommitAck,
  encodeDigest,
  encodeHello,
  encodeRoundAck,
  decodeCommit,
  decodeRoundEnd,
} from '../src/protocol/messages.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { secureAccept, secureConnect, type Credentials } from '../src/security/tls.js';
import { migrate } from '../src/source/migrate.js';
import { makeCa, opensslMissing } from './certs.js';
import { FrameParser } from './reference/frames.js';

/** A destination of a few lines that accepts everything and, at DEVICE_STATE, tries `trick`. */
async function impostor(trick: 'activate-at-once' | 'wrong-digest'): Promise<{ port: number; close(): void }> {
  const server = net.createServer((s) => {
    const parser = new FrameParser();
    s.on('error', () => undefined);
    s.on('data', (chunk: Buffer) =>
      parser.push(chunk, (f) => {
        if (f.type === FrameType.Hello) s.write(encodeAccept({ version: 3, capabilities: [CAP_COMMIT_ACTIVATE] }, 3));
        else if (f.type === FrameType.RoundEnd) s.write(encodeRoundAck(decodeRoundEnd(f.payload), 3));
        else if (f.type === FrameType.DeviceState) {
          s.write(trick === 'activate-at-once' ? encodeActivated({ activateMs: 0.1 }, 3) : encodeDigest({ digest: 0x1234n, pageCount: 64 }, 3));
        } else if (f.type === FrameType.Commit) s.write(encodeActivated({ activateMs: 0.1 }, 3)); // would echo whatever came
      }),
    );
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, close: () => server.close() };
}

for (const trick of ['activate-at-once', 'wrong-digest'] as const) {
  test(`an impostor destination (${trick}) cannot make the source release: the guest resumes here`, async () => {
    const fake = await impostor(trick);
    const region = Region.create(64 * 4096, { name: `proof-${trick}` });
    let resumed = 0;
    let released = 0;
    try {
      await assert.rejects(
        migrate({
          region,
          to: { host: '127.0.0.1', port: fake.port },
          encodings: { zero: false, dedup: false, compress: false },
          pause: async () => new Uint8Array(4),
          resume: async () => void resumed++,
          release: async () => void released++,
        }),
        (e: unknown) =>
          e instanceof LivemigError &&
          (trick === 'wrong-digest'
            ? e.code === 'ERR_LIVEMIG_DIGEST' && /does not hold this image/.test(e.message)
            : e.code === 'ERR_LIVEMIG_PROTOCOL' && /expected Digest, got Activated/.test(e.message)),
      );
      assert.equal(resumed, 1, 'the guest resumed on the source');
      assert.equal(released, 0, 'the source copy was not released');
    } finally {
      fake.close();
      region.release();
    }
  });
}

test('with credentials, a source that speaks only version 2 is refused before anything is reserved', { skip: opensslMissing }, async () => {
  const { ca, certs } = makeCa(['src', 'dst']);
  let reserved = 0;
  const rx = await listen('127.0.0.1', 0, {
    credentials: { kind: 'cert', ...certs['dst']!, ca, allow: ['src'] },
    onReserved: () => void reserved++,
    activate: async () => undefined,
  });
  const outcome = rx.next();
  outcome.catch(() => undefined);
  try {
    const raw = net.connect(rx.port, '127.0.0.1');
    await new Promise<void>((r) => raw.once('connect', r));
    const s = await secureConnect(raw, { kind: 'cert', ...certs['src']!, ca, peerName: 'dst' });
    await s.conn.send(encodeHello({ versions: [1, 2], regionBytes: 64 * 4096, pageSize: 4096, auth: null, capabilities: [CAP_COMMIT_ACTIVATE] }));
    const f = await s.conn.next(5000);
    assert.equal(f.type, FrameType.Error);
    assert.equal(decodeError(f.payload).code, 'ERR_LIVEMIG_VERSION');
    await assert.rejects(outcome, (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_VERSION' && /version 3 needed/.test(e.message));
    assert.equal(reserved, 0);
    s.conn.close();
  } finally {
    await rx.close();
  }
});

/**
 * A destination that holds the key (or, on loopback, needs none) but negotiates the proof away:
 * ACCEPT without commit-activate (or of version 2), then it echoes COMMIT_ACK and ACTIVATED to
 * whatever comes. The source must refuse it before pausing anything.
 */
async function downgrader(accept: { version: number; capabilities: string[] }, creds?: Credentials): Promise<{ port: number; close(): void; commits: number }> {
  const state = { commits: 0 };
  const server = net.createServer({ pauseOnConnect: true }, (raw) => {
    raw.on('error', () => undefined);
    void (async () => {
      const conn = creds ? (await secureAccept(raw, creds)).conn : (await import('../src/protocol/connection.js')).FramedConnection.fromSocket(raw);
      try {
        for (;;) {
          const f = await conn.next(10_000);
          const v = accept.version;
          if (f.type === FrameType.Hello) await conn.send(encodeAccept(accept, v));
          else if (f.type === FrameType.RoundEnd) await conn.send(encodeRoundAck(decodeRoundEnd(f.payload), v));
          else if (f.type === FrameType.Commit) {
            state.commits++;
            await conn.send(encodeCommitAck({ digest: decodeCommit(f.payload).digest }, v));
            await conn.send(encodeActivated({ activateMs: 0.1 }, v));
          } else if (f.type === FrameType.Activate) await conn.send(encodeActivated({ activateMs: 0.1 }, v));
        }
      } catch {
        conn.close(); // the source went away
      }
    })().catch(() => raw.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => server.close(),
    get commits() {
      return state.commits;
    },
  };
}

const downgrades = [
  { name: 'version 3 without commit-activate', accept: { version: 3, capabilities: [] }, code: 'ERR_LIVEMIG_PROTOCOL', why: /drops commit-activate/ },
  {
    name: 'version 3 with every other capability',
    accept: { version: 3, capabilities: ['encodings', 'resolve'] },
    code: 'ERR_LIVEMIG_PROTOCOL',
    why: /drops commit-activate/,
  },
  {
    name: 'version 2 with commit-activate',
    accept: { version: 2, capabilities: [CAP_COMMIT_ACTIVATE] },
    code: 'ERR_LIVEMIG_VERSION',
    why: /proves it holds the image/,
  },
  { name: 'version 1', accept: { version: 1, capabilities: [] }, code: 'ERR_LIVEMIG_VERSION', why: /proves it holds the image/ },
];
for (const keyed of [false, true]) {
  for (const d of downgrades) {
    test(
      `a ${keyed ? 'keyed' : 'loopback'} destination that negotiates the proof away (${d.name}) cannot make the source release`,
      { skip: keyed ? opensslMissing : false },
      async () => {
        const pair = keyed ? makeCa(['src', 'dst']) : undefined;
        const fake = await downgrader(d.accept, pair ? { kind: 'cert', ...pair.certs['dst']!, ca: pair.ca, allow: ['src'] } : undefined);
        const region = Region.create(64 * 4096, { name: 'proof-downgrade' });
        let paused = 0;
        let released = 0;
        try {
          await assert.rejects(
            migrate({
              region,
              to: { host: '127.0.0.1', port: fake.port },
              ...(pair ? { credentials: { kind: 'cert' as const, ...pair.certs['src']!, ca: pair.ca, peerName: 'dst' } } : {}),
              encodings: { zero: false, dedup: false, compress: false },
              pause: async () => (paused++, new Uint8Array(4)),
              resume: async () => undefined,
              release: async () => void released++,
            }),
            (e: unknown) => e instanceof LivemigError && e.code === d.code && d.why.test(e.message) && e.phase === 'handshake',
          );
          assert.equal(released, 0, 'the source copy was not released');
          assert.equal(paused, 0, 'the guest was never paused: it runs on the source');
          assert.equal(fake.commits, 0, 'no COMMIT went to it');
        } finally {
          fake.close();
          region.release();
        }
      },
    );
  }
}
