/**
 * A commitment whose confirmation is lost (issue 18, point 3): the source does not guess. It
 * asks the destination on a new connection (RESOLVE): activated -> this copy is released;
 * not activated -> the destination fences the session for good and the guest resumes here;
 * no answer in time -> ERR_LIVEMIG_ACTIVATION_UNKNOWN, the guest paused, and the command that
 * resolves it later (`livemig resolve`), which gives the same answer.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { FrameType } from '../src/protocol/format.js';
import { encodeFrame } from '../src/protocol/frame.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { askOutcome } from '../src/source/resolve.js';
import { migrate } from '../src/source/migrate.js';
import { FrameParser } from './reference/frames.js';

type Cut = 'after-commit' | 'before-commit';

/**
 * A proxy that forwards frame by frame and, on the first migration connection, cuts the link
 * at COMMIT: after forwarding it (the destination activates, ACTIVATED never comes back) or
 * instead of it (the destination never hears it). With `refuseAfter`, every later connection
 * is refused (the destination unreachable).
 */
async function cuttingProxy(port: number, cut: Cut, refuseAfter = false): Promise<{ port: number; cuts(): number; close(): void }> {
  let cuts = 0;
  let first = true;
  const server = net.createServer((c) => {
    if (!first && refuseAfter) return void c.destroy();
    const isFirst = first;
    first = false;
    const up = net.connect(port, '127.0.0.1');
    for (const s of [c, up]) s.on('error', () => undefined);
    up.on('data', (d: Buffer) => c.write(d));
    c.on('close', () => up.destroy());
    up.on('close', () => c.destroy());
    if (!isFirst) {
      c.on('data', (d: Buffer) => up.write(d));
      return;
    }
    const parser = new FrameParser();
    c.on('data', (d: Buffer) =>
      parser.push(d, (f) => {
        if (f.type === FrameType.Commit) {
          cuts++;
          c.destroy(); // the source hears nothing more, ACTIVATED included
          if (cut === 'after-commit') up.end(encodeFrame(f.type, f.payload, f.version, f.flags));
          else up.destroy();
          return;
        }
        up.write(encodeFrame(f.type, f.payload, f.version, f.flags));
      }),
    );
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, cuts: () => cuts, close: () => server.close() };
}

async function run(cut: Cut, refuseAfter = false) {
  const region = Region.create(128 * 4096, { name: `resolve-${cut}` });
  for (let p = 0; p < region.pageCount; p++) region.page(p).fill(p & 255);
  let activated = 0;
  let resumed = 0;
  let released = 0;
  const rx = await listen('127.0.0.1', 0, { activate: async () => void activated++ });
  const received = rx.next();
  received.catch(() => undefined);
  const px = await cuttingProxy(rx.port, cut, refuseAfter);
  let report: Awaited<ReturnType<typeof migrate>> | undefined;
  let error: LivemigError | undefined;
  try {
    report = await migrate({
      region,
      to: { host: '127.0.0.1', port: px.port },
      // the proxy cuts the first connection and may refuse the later ones: one channel
      channels: 1,
      encodings: { zero: false, dedup: false, compress: false },
      resolveTimeoutMs: refuseAfter ? 600 : 10_000,
      pause: async () => new Uint8Array(8),
      resume: async () => void resumed++,
      release: async () => void released++,
    });
  } catch (e) {
    error = e as LivemigError;
  }
  const rxOutcome = await received.then(
    (r) => r,
    (e: unknown) => e as LivemigError,
  );
  return {
    report,
    error,
    activated,
    resumed,
    released,
    cuts: px.cuts(),
    rxOutcome,
    rxPort: rx.port,
    close: async () => (px.close(), await rx.close(), region.release()),
  };
}

test('the link lost after COMMIT reached the destination: asked again, it says activated, and the source copy is released', async () => {
  const r = await run('after-commit');
  try {
    assert.equal(r.cuts, 1, 'the link was cut at COMMIT');
    assert.ok(r.report, `the migration completes: ${String(r.error)}`);
    assert.equal(r.activated, 1, 'the destination activated');
    assert.deepEqual([r.resumed, r.released], [0, 1], 'released here, never resumed: one guest');
  } finally {
    await r.close();
  }
});

test('the link lost before COMMIT arrived: the destination fences the session, the guest resumes here, and it never activates', async () => {
  const r = await run('before-commit');
  try {
    assert.equal(r.cuts, 1);
    assert.ok(r.error, 'the migration fails');
    assert.match(r.error.message, /did not activate and has fenced the session: the guest resumes here/);
    assert.equal(r.activated, 0, 'nothing was activated');
    assert.deepEqual([r.resumed, r.released], [1, 0], 'resumed here: one guest');
    assert.ok(r.rxOutcome instanceof LivemigError, 'the destination ended that migration');
  } finally {
    await r.close();
  }
});

test('no answer within resolveTimeoutMs: ERR_LIVEMIG_ACTIVATION_UNKNOWN with the command that resolves it; that command later gets the answer', async () => {
  const r = await run('after-commit', true);
  try {
    assert.ok(r.error, 'the migration fails');
    assert.equal(r.error.code, 'ERR_LIVEMIG_ACTIVATION_UNKNOWN');
    const m = /livemig resolve --to 127\.0\.0\.1:\d+ --session ([0-9a-f]{32})/.exec(r.error.message);
    assert.ok(m, `the error names the command: ${r.error.message}`);
    assert.deepEqual([r.resumed, r.released], [0, 0], 'the guest stays paused, not released');
    // the operator asks the destination itself (the proxy refuses): it activated
    assert.equal(await askOutcome({ to: { host: '127.0.0.1', port: r.rxPort }, session: m[1]!, handshakeTimeoutMs: 5_000 }), 'activated');
    await assert.rejects(
      askOutcome({ to: { host: '127.0.0.1', port: r.rxPort }, session: 'f'.repeat(32), handshakeTimeoutMs: 5_000 }),
      (e: unknown) => e instanceof LivemigError && /no session this receiver knows/.test(e.message),
      'an unknown session is refused, not guessed',
    );
  } finally {
    await r.close();
  }
});
