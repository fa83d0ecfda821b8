/**
 * A destination's refusals are visible there and told to the source in words (issue 31, item 6).
 * `livemig serve` refuses a source whose certificate name is not in --allow, and sources whose
 * pre-shared key (or its identity) differs: for each one {refused} line (the source's address,
 * the reason and the code), an incoming migration in state `refused` with the reason, and the
 * refusal counter by reason; the source's error says what differs. A listener publishes each
 * refusal as a diagnostics event, and tells its owner of busy and memory refusals too.
 */
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { request } from '../src/daemon/client.js';
import { DaemonProcess } from '../src/daemon/process.js';
import { LivemigError } from '../src/errors.js';
import { CAP_COMMIT_ACTIVATE, FrameType } from '../src/protocol/format.js';
import { FramedConnection } from '../src/protocol/connection.js';
import { decodeError, encodeHello } from '../src/protocol/messages.js';
import { listen } from '../src/receiver/listen.js';
import { isRefusedBeforeReserving } from '../src/receiver/receiver.js';
import type { Refusal } from '../src/refusals.js';
import { Region } from '../src/region/region.js';
import type { Credentials } from '../src/security/tls.js';
import { migrate } from '../src/source/migrate.js';
import { DIAGNOSTICS_CHANNEL_NAMES } from '../src/trace.js';
import { ReceiverEvent } from '../src/trace-events.js';
import { makeCa, opensslMissing } from './certs.js';
import { until } from './helpers.js';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});
function tmp(tag: string): string {
  const d = mkdtempSync(path.join(os.tmpdir(), `livemig-refusals-${tag}-`));
  dirs.push(d);
  return d;
}

/** A migration from a small region with `credentials`: the error it ends with (it must fail). */
async function refusedSource(port: number, credentials: Credentials): Promise<LivemigError> {
  const region = Region.create(64 * 4096, { name: 'refused-source' });
  let resumed = 0;
  try {
    const e = await migrate({
      region,
      to: { host: '127.0.0.1', port },
      pause: async () => new Uint8Array(8),
      resume: async () => void resumed++,
      credentials,
    }).then(
      () => assert.fail('the destination took a source it should refuse'),
      (err: unknown) => err,
    );
    assert.ok(e instanceof LivemigError, String(e));
    assert.equal(resumed, 0, 'refused in the handshake: the guest was never paused');
    return e;
  } finally {
    region.release();
  }
}

/** What the destination shows of its refusals: the {refused} lines, the refused incoming migrations, the counter by reason. */
async function seenAtDestination(
  d: DaemonProcess,
  count: number,
): Promise<{ lines: Refusal[]; records: Record<string, unknown>[]; counted: Map<string, number> }> {
  const refusedLines = (): Refusal[] => d.lines.map((l) => (JSON.parse(l) as { refused?: Refusal }).refused).filter((r): r is Refusal => r !== undefined);
  await until(`${count} {refused} lines from livemig serve`, () => refusedLines().length >= count);
  const api = { socketPath: d.socketPath };
  const { body } = await request<{ migrations: Record<string, unknown>[] }>(api, 'GET', '/v1/migrations?direction=incoming');
  const text = await new Promise<string>((resolve, reject) =>
    http
      .get({ socketPath: d.socketPath, path: '/metrics' }, (res) => {
        let s = '';
        res.on('data', (c: Buffer) => (s += c.toString()));
        res.on('end', () => resolve(s));
      })
      .on('error', reject),
  );
  const family = parsePrometheusTextFormat(text).find((f) => f.name === 'livemig_incoming_refused_total');
  assert.ok(family, 'the refusal counter is exposed');
  const counted = new Map(family.metrics.map((m): [string, number] => [String(m.labels?.['reason']), Number(m.value)]));
  return { lines: refusedLines(), records: body.migrations, counted };
}

test(
  "a source whose certificate name is not in --allow: refused with its name in the source's error, and logged, recorded and counted at the destination",
  { skip: opensslMissing },
  async () => {
    const dir = tmp('cert');
    const { ca, certs } = makeCa(['src', 'dst', 'mallory']);
    const file = (name: string, data: Buffer): string => {
      const p = path.join(dir, name);
      writeFileSync(p, data, { mode: 0o600 });
      return p;
    };
    const tls = ['--tls-cert', file('dst.crt', certs['dst']!.cert), '--tls-key', file('dst.key', certs['dst']!.key), '--tls-ca', file('ca.crt', ca)];
    const d = await DaemonProcess.start({ dir: path.join(dir, 'daemon'), args: [...tls, '--allow', 'src'] });
    try {
      const e = await refusedSource(d.port, { kind: 'cert', ...certs['mallory']!, ca, peerName: 'dst' });
      assert.equal(e.code, 'ERR_LIVEMIG_AUTH');
      assert.match(e.message, /the source's certificate name 'mallory' is not in --allow/, 'the source is told what differs');
      const seen = await seenAtDestination(d, 1);
      const line = seen.lines[0]!;
      assert.deepEqual([line.reason, line.code, line.peer], ['peer-not-allowed', 'ERR_LIVEMIG_AUTH', 'mallory'], JSON.stringify(line));
      assert.match(line.from, /^127\.0\.0\.1:\d+$/, 'the line names where the source connected from');
      const record = seen.records.find((m) => m['state'] === 'refused');
      assert.ok(record, `an incoming migration in state refused: ${JSON.stringify(seen.records)}`);
      assert.deepEqual(record['refusal'], { reason: 'peer-not-allowed', from: line.from, peer_name: 'mallory' });
      assert.equal((record['error'] as { code: string }).code, 'ERR_LIVEMIG_AUTH');
      assert.equal(seen.counted.get('peer-not-allowed'), 1);
      assert.equal(seen.counted.get('psk-mismatch'), 0, 'every reason is exposed from the start, at 0');
    } finally {
      await d.stop();
    }
  },
);

test("a pre-shared key or identity that differs: 'the pre-shared keys differ' at the source; logged, recorded and counted at the destination", async () => {
  const dir = tmp('psk');
  const key = Buffer.alloc(32, 7);
  const psk = path.join(dir, 'dst.psk');
  writeFileSync(psk, `src:${key.toString('hex')}\n`, { mode: 0o600 });
  const d = await DaemonProcess.start({ dir: path.join(dir, 'daemon'), args: ['--psk-file', psk] });
  try {
    const otherKey = await refusedSource(d.port, { kind: 'psk', identity: 'src', key: Buffer.alloc(32, 8) });
    assert.equal(otherKey.code, 'ERR_LIVEMIG_AUTH');
    assert.match(otherKey.message, /^the pre-shared keys differ/, `not OpenSSL's words: ${otherKey.message}`);
    assert.doesNotMatch(otherKey.message, /alert|bad record mac/i);
    const otherIdentity = await refusedSource(d.port, { kind: 'psk', identity: 'mallory', key });
    assert.equal(otherIdentity.code, 'ERR_LIVEMIG_AUTH');
    assert.match(otherIdentity.message, /^the pre-shared keys differ.*'mallory'/, otherIdentity.message);
    const seen = await seenAtDestination(d, 2);
    for (const line of seen.lines) {
      assert.deepEqual([line.reason, line.code], ['psk-mismatch', 'ERR_LIVEMIG_AUTH'], JSON.stringify(line));
      assert.match(line.from, /^127\.0\.0\.1:\d+$/);
      assert.equal(line.peer, undefined, 'a source that did not prove the key is not named as a peer');
    }
    const records = seen.records.filter((m) => m['state'] === 'refused');
    assert.equal(records.length, 2, JSON.stringify(seen.records));
    for (const r of records) assert.equal((r['refusal'] as { reason: string }).reason, 'psk-mismatch');
    assert.equal(seen.counted.get('psk-mismatch'), 2);
    assert.equal(seen.counted.get('peer-not-allowed'), 0);
  } finally {
    await d.stop();
  }
});

test('every refusal is a named diagnostics event: the receiver publishes where from, why and the code, as it tells its owner', async () => {
  const key = Buffer.alloc(32, 7);
  const published: (Refusal & { event: string; ms: number })[] = [];
  const onMessage = (m: unknown): void => {
    if ((m as { event?: string }).event === ReceiverEvent.connectionRefused) published.push(m as Refusal & { event: string; ms: number });
  };
  diagnostics_channel.subscribe(DIAGNOSTICS_CHANNEL_NAMES.receiver, onMessage);
  const heard: Refusal[] = [];
  const rx = await listen(
    '127.0.0.1',
    0,
    { credentials: { kind: 'psk', identity: 'src', key }, activate: async () => undefined },
    { onRefused: (r) => void heard.push(r) },
  );
  try {
    const e = await refusedSource(rx.port, { kind: 'psk', identity: 'src', key: Buffer.alloc(32, 8) });
    assert.match(e.message, /^the pre-shared keys differ/);
    await until('the refusal is heard', () => heard.length === 1);
    assert.equal(published.length, 1, 'one event for one refusal');
    const { event: _event, ms: _ms, ...payload } = published[0]!;
    assert.deepEqual(payload, heard[0]);
    assert.deepEqual([heard[0]!.reason, heard[0]!.code], ['psk-mismatch', 'ERR_LIVEMIG_AUTH']);
  } finally {
    diagnostics_channel.unsubscribe(DIAGNOSTICS_CHANNEL_NAMES.receiver, onMessage);
    await rx.close();
  }
});

test('a HELLO while the one migration runs is refused as busy, and one larger than --max-region for memory: each heard once, with its reason', async () => {
  const heard: Refusal[] = [];
  const rx = await listen('127.0.0.1', 0, { maxRegionBytes: 128 * 4096, activate: async () => undefined }, { onRefused: (r) => void heard.push(r) });
  const outcomes: Promise<unknown>[] = [rx.next().catch((e: unknown) => e)];
  const hello = (pages: number): Buffer =>
    encodeHello({ versions: [3, 3], regionBytes: pages * 4096, pageSize: 4096, auth: null, capabilities: [CAP_COMMIT_ACTIVATE] });
  const open = async (): Promise<FramedConnection> => {
    const s = net.connect(rx.port, '127.0.0.1');
    await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
    return FramedConnection.fromSocket(s);
  };
  const conns: FramedConnection[] = [];
  try {
    const first = await open();
    conns.push(first);
    await first.send(hello(64));
    assert.equal((await first.next(20_000)).type, FrameType.Accept, 'the first HELLO takes the slot');
    const second = await open();
    conns.push(second);
    await second.send(hello(64));
    const busy = await second.next(20_000);
    assert.equal(busy.type, FrameType.Error, 'the second is answered with ERROR');
    assert.match(decodeError(busy.payload).message, /already running/, 'in words');
    await until('the busy refusal is heard', () => heard.length === 1);
    assert.deepEqual([heard[0]!.reason, heard[0]!.code], ['busy', 'ERR_LIVEMIG_REFUSED']);
    first.close(); // the running migration fails (not a refusal): the slot is free again
    await outcomes[0];
    outcomes.push(rx.next().catch((e: unknown) => e));
    const big = await open();
    conns.push(big);
    await big.send(hello(256));
    const memory = await big.next(20_000);
    assert.equal(memory.type, FrameType.Error);
    assert.equal(decodeError(memory.payload).code, 'ERR_LIVEMIG_NO_MEMORY');
    await until('the memory refusal is heard', () => heard.length === 2);
    assert.deepEqual([heard[1]!.reason, heard[1]!.code], ['memory', 'ERR_LIVEMIG_NO_MEMORY']);
    assert.match(heard[1]!.from, /^127\.0\.0\.1:\d+$/);
    const refused = await outcomes[1];
    assert.ok(isRefusedBeforeReserving(refused), 'the HELLO refused for memory still settles its own outcome, as refused before reserving');
    assert.equal(heard.length, 2, 'the failed migration was no refusal');
  } finally {
    for (const c of conns) c.close();
    await rx.close();
  }
});
