/**
 * The daemon's parts that decide alone: the fair bandwidth share, the memory budget, the event
 * history, the bound on refused records; and cancel() inside stop-and-copy (the API's cancel is
 * MigrationControl.cancel); the client's GET sent again when the daemon had closed the
 * kept-alive connection it went out on. Progress has its own file, progress.test.ts.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import { request } from '../src/daemon/client.js';
import { BandwidthShare } from '../src/daemon/bandwidth.js';
import { MemoryBudget } from '../src/daemon/budget.js';
import { EventBus } from '../src/daemon/events.js';
import { Migration, MigrationTable, REFUSED_KEPT } from '../src/daemon/migration.js';
import { LivemigError } from '../src/errors.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { migrate } from '../src/source/migrate.js';
import { MigrationControl } from '../src/source/types.js';

test('the total bandwidth is shared max-min fairly, and follows joins, leaves and changes', () => {
  const share = new BandwidthShare(300);
  const caps = new Map<string, number | undefined>();
  const control = (id: string): MigrationControl => {
    const c = new MigrationControl();
    const set = c.setBandwidth.bind(c);
    c.setBandwidth = (m) => (caps.set(id, m), set(m));
    return c;
  };
  share.join('a', control('a'), undefined);
  assert.equal(caps.get('a'), 300);
  share.join('b', control('b'), 50);
  share.join('c', control('c'), undefined);
  assert.deepEqual([caps.get('a'), caps.get('b'), caps.get('c')], [125, 50, 125], 'b asked for less: the rest is split');
  share.want('b', 1000);
  assert.deepEqual([caps.get('a'), caps.get('b'), caps.get('c')], [100, 100, 100]);
  share.leave('a');
  assert.deepEqual([caps.get('b'), caps.get('c')], [150, 150]);
  const free = new BandwidthShare(undefined);
  free.join('x', control('x'), 40);
  free.join('y', control('y'), undefined);
  assert.deepEqual([caps.get('x'), caps.get('y')], [40, undefined], 'without a total each keeps its own cap');
});

test('the memory budget refuses what does not fit, whole, and takes bytes back once', () => {
  const b = new MemoryBudget(100);
  const r1 = b.take(60, { local: false });
  assert.throws(
    () => b.take(50, { local: false }),
    (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_NO_MEMORY' && /60 bytes are reserved/.test(e.message),
  );
  assert.equal(b.reserved, 60, 'a refusal takes nothing');
  const local = b.take(1000, { local: true });
  assert.equal(b.reserved, 60, 'a same-host upgrade allocates nothing');
  local();
  r1();
  r1();
  assert.equal(b.reserved, 0, 'given back once');
  assert.equal(b.peak, 60);
  const host = new MemoryBudget(undefined, () => ({ bytes: 80, why: 'test host' }));
  host.take(50, { local: false });
  assert.throws(
    () => host.take(40, { local: false }),
    (e: unknown) => e instanceof LivemigError && /test host/.test(e.message),
  );
  assert.throws(
    () => new MemoryBudget(-1),
    (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_INVALID_ARGUMENT',
  );
});

test('the event history replays a migration from its start, or after an id, without old progress', () => {
  const bus = new EventBus();
  const seen: number[] = [];
  const off = bus.subscribe((e) => void seen.push(e.id));
  bus.publish('m1', 'state', { state: 'running' });
  bus.publish('m2', 'state', { state: 'running' });
  bus.publish('m1', 'progress', { percent: 10 });
  bus.publish('m1', 'round', { round: 1 });
  off();
  bus.publish('m1', 'state', { state: 'completed' });
  assert.deepEqual(seen, [1, 2, 3, 4]);
  assert.deepEqual(
    bus.history('m1').map((e) => e.type),
    ['state', 'round', 'state'],
  );
  assert.deepEqual(
    bus.history('m1', 4).map((e) => e.id),
    [5],
  );
  assert.deepEqual(
    bus.history(undefined).map((e) => e.migration),
    ['m1', 'm2', 'm1', 'm1'],
  );
  bus.forget('m1');
  assert.deepEqual(bus.history('m1'), []);
});

test('cancel() inside stop-and-copy (the guest being paused) ends the migration before its commitment; the guest resumes', async () => {
  const region = Region.create(256 * 4096, { name: 'cancel-sc' });
  let resumed = 0;
  let discarded = 0;
  const rx = await listen('127.0.0.1', 0, { onDiscard: () => void discarded++, activate: async () => undefined });
  const control = new MigrationControl();
  try {
    const received = rx.next();
    received.catch(() => undefined);
    await assert.rejects(
      migrate({
        region,
        to: { host: '127.0.0.1', port: rx.port },
        control,
        pause: async () => {
          control.cancel(); // the orchestrator's cancel arrives while the guest is being paused
          return new Uint8Array(8);
        },
        resume: async () => void resumed++,
      }),
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CANCELLED' && e.phase === 'stop-and-copy',
    );
    assert.equal(resumed, 1, 'the guest resumed on the source');
    // the source said so: the destination ends it as a cancel, not as a lost connection
    await assert.rejects(
      received,
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CANCELLED' && /^cancelled by the source: /.test(e.message),
    );
    assert.equal(discarded, 1, 'the destination discarded its copy');
  } finally {
    await rx.close();
    region.release();
  }
});

test('refused sources are kept apart and bounded: a crowd of refusals keeps only the latest, and pushes no finished migration out', () => {
  const bus = new EventBus();
  const table = new MigrationTable(bus);
  const settings = {
    mode: 'precopy',
    downtime_limit_ms: undefined,
    bandwidth_mib_s: undefined,
    postcopy_bandwidth_mib_s: undefined,
    deadline_s: undefined,
    on_stall: undefined,
    encodings: true,
  } as const;
  const migration = (): Migration => new Migration({ direction: 'incoming', guest: '', peer: '127.0.0.1:1', totalBytes: 0, bus, settings });
  const failed = migration();
  table.add(failed);
  failed.fail(new LivemigError('ERR_LIVEMIG_CONNECTION', 'the source went away', { phase: 'receiving' }));
  const refused: Migration[] = [];
  for (let i = 0; i < REFUSED_KEPT + 50; i++) {
    const m = migration();
    table.add(m);
    m.refuse({
      from: `10.0.0.${i % 250}:${1000 + i}`,
      reason: 'psk-mismatch',
      code: 'ERR_LIVEMIG_AUTH',
      phase: 'handshake',
      message: 'the pre-shared keys differ',
    });
    refused.push(m);
  }
  table.add(migration()); // the last refusal is pruned at the next add
  const kept = table.list().filter((m) => m.state === 'refused');
  assert.equal(kept.length, REFUSED_KEPT);
  assert.deepEqual(
    kept.map((m) => m.id),
    refused.slice(-REFUSED_KEPT).map((m) => m.id),
    'the latest are kept',
  );
  assert.equal(table.get(failed.id).state, 'failed', 'the finished migration is still there');
  assert.deepEqual(bus.history(refused[0]!.id), [], 'a forgotten refusal keeps no event history');
  const view = kept.at(-1)!.view();
  assert.deepEqual(view['refusal'], { reason: 'psk-mismatch', from: refused.at(-1)!.refusal!.from });
  assert.deepEqual(view['error'], { code: 'ERR_LIVEMIG_AUTH', phase: 'handshake', message: 'the pre-shared keys differ' });
});

test('a GET on a kept-alive connection the server closed meanwhile goes out again on a new one; a POST does not', async () => {
  // each connection answers its first request (keeping it alive) and resets at its second:
  // the race of a server closing an idle connection as the client reuses it, made certain
  const connections: net.Socket[] = [];
  const server = net.createServer((c) => {
    connections.push(c);
    let requests = 0;
    c.on('data', () => {
      if (++requests > 1) return void c.resetAndDestroy();
      c.write('HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\nconnection: keep-alive\r\n\r\n{"ok":true}');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const t = { host: '127.0.0.1', port: (server.address() as net.AddressInfo).port };
  try {
    assert.deepEqual((await request(t, 'GET', '/v1/health')).body, { ok: true });
    assert.deepEqual((await request(t, 'GET', '/v1/health')).body, { ok: true }, 'sent again on a new connection');
    assert.equal(connections.length, 2);
    await assert.rejects(request(t, 'POST', '/v1/migrations', {}), { code: 'ERR_LIVEMIG_CONNECTION' }, 'a POST may have been acted on: not sent twice');
  } finally {
    for (const c of connections) c.destroy();
    server.close();
  }
});
