/**
 * The daemon's migration history outlives it (issue 31, item 10): `livemig serve` processes
 * stopped (SIGTERM, or killed) and started again on the same directory list their earlier
 * migrations, with reports and events; the list filters by state and time; the bounds prune
 * the oldest, in the file too; a file the daemon cannot use stops it at start, saying why.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import Database from 'better-sqlite3';
import { followEvents, request, type ApiTarget, type StreamEvent } from '../src/daemon/client.js';
import { DaemonProcess } from '../src/daemon/process.js';
import { probe } from '../src/tracking/probe.js';
import { call, Pids, registerGuest, settled } from './daemon-helpers.js';
import { until } from './helpers.js';

const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const skip = uffd.available ? false : uffd.reason;
const MiB = 1 << 20;
const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

const dirs: string[] = [];
const pids = new Pids();
const daemons: DaemonProcess[] = [];
function tmp(tag: string): string {
  const d = mkdtempSync(path.join(os.tmpdir(), `livemig-history-${tag}-`));
  dirs.push(d);
  return d;
}
async function daemon(dir: string, args: string[] = []): Promise<{ d: DaemonProcess; api: ApiTarget }> {
  const d = await DaemonProcess.start({ dir, args });
  daemons.push(d);
  return { d, api: { socketPath: d.socketPath } };
}
afterEach(async () => {
  for (const d of daemons.splice(0)) await d.stop();
  pids.killAll();
});
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

type View = Record<string, unknown> & { id: string; state: string };
const list = async (api: ApiTarget, query = ''): Promise<View[]> =>
  (await request<{ migrations: View[] }>(api, 'GET', `/v1/migrations${query}`)).body.migrations;
/** A migration's whole event stream (the daemon ends it after the final state). */
async function events(api: ApiTarget, id: string): Promise<StreamEvent[]> {
  const seen: StreamEvent[] = [];
  await followEvents(api, `/v1/migrations/${id}/events`, (e) => void seen.push(e));
  return seen;
}
/** A source the migration port refuses: it sends no frame the protocol allows. */
async function refusedSource(port: number): Promise<void> {
  const s = net.connect(port, '127.0.0.1');
  await once(s, 'connect');
  s.end(Buffer.alloc(64, 0xee));
  await once(s, 'close');
}
/** A port nothing listens on. */
async function closedPort(): Promise<number> {
  const server = net.createServer().listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((r) => server.close(r));
  return port;
}
/** The destination guests a daemon started (the test ends them: they run on by design). */
async function destinationGuests(api: ApiTarget): Promise<void> {
  for (const m of await list(api, '?direction=incoming')) if (typeof m['guest_pid'] === 'number') pids.push(m['guest_pid']);
}

test('a migration and a refused source outlive a SIGTERM restart: listed, filtered, with report, rounds and events', { skip }, async () => {
  const dir = tmp('restart');
  let { d: a, api: A } = await daemon(dir);
  const { api: B, d: b } = await daemon(tmp('restart-b'));
  const g = await registerGuest(A, a.guests, 'h1', { size: 16 * MiB });
  pids.push(g.pid);
  const created = await request<{ id: string }>(A, 'POST', '/v1/migrations', { guest: 'h1', to: { host: '127.0.0.1', port: b.port } });
  const moved = await settled(A, created.body.id);
  assert.equal(moved['state'], 'completed', JSON.stringify(moved['error']));
  await destinationGuests(B);
  const before = await events(A, moved['id'] as string);
  // every migration after this instant was created at or after it
  await new Promise((r) => setTimeout(r, 5));
  const between = new Date();
  await refusedSource(a.port);
  await until('the refusal is listed', async () => (await list(A, '?state=refused')).length === 1);
  const refusedBefore = (await list(A, '?state=refused'))[0]!;

  assert.equal(await a.stop(), 0);
  ({ d: a, api: A } = await daemon(dir));
  const all = await list(A);
  assert.deepEqual(
    all.map((m) => [m.id, m.state]),
    [
      [moved['id'], 'completed'],
      [refusedBefore.id, 'refused'],
    ],
    'both, oldest first',
  );
  const again = (await request<View>(A, 'GET', `/v1/migrations/${created.body.id}`)).body;
  for (const k of [
    'direction',
    'guest',
    'peer',
    'state',
    'stage',
    'created_at',
    'started_at',
    'finished_at',
    'progress',
    'settings',
    'source_guest',
    'report',
    'rounds',
  ]) {
    assert.deepEqual(again[k], moved[k], `${k} as before the restart`);
  }
  assert.ok((again['rounds'] as unknown[]).length >= 1, 'its rounds');
  assert.deepEqual(all[1], refusedBefore, 'the refused source as before, its reason and error included');
  const replayed = await events(A, created.body.id);
  assert.deepEqual(replayed, before, 'the same events, ids and data, ending with its final state');
  assert.deepEqual(before.filter((e) => e.event !== 'progress').at(-1)?.data['state'], 'completed');

  // the filters
  assert.deepEqual(
    (await list(A, '?state=completed')).map((m) => m.id),
    [created.body.id],
  );
  assert.deepEqual(
    (await list(A, '?state=failed')).map((m) => m.id),
    [],
  );
  assert.deepEqual(
    (await list(A, `?since=${encodeURIComponent(between.toISOString())}`)).map((m) => m.id),
    [refusedBefore.id],
  );
  // the same instants written an hour ahead, with their offset
  const plusOne = (ms: number): string => encodeURIComponent(new Date(ms + 3600_000).toISOString().replace('Z', '+01:00'));
  const born = Date.parse(String(moved['created_at']));
  assert.deepEqual(
    (await list(A, `?since=${plusOne(born)}`)).map((m) => m.id),
    [created.body.id, refusedBefore.id],
    'at or after: its own instant included',
  );
  assert.deepEqual(
    (await list(A, `?since=${plusOne(born + 1)}`)).map((m) => m.id),
    [refusedBefore.id],
  );
  assert.deepEqual(await list(A, '?since=2099-01-01T00:00:00Z&state=refused'), []);
  for (const [query, field] of [
    ['?since=yesterday', 'since'],
    ['?since=2026-02-30T00:00:00Z', 'since'],
    ['?since=1765000000000', 'since'],
    ['?since=2026-12-06T10:00:00', 'since'],
    ['?state=lost', 'state'],
  ] as const) {
    const r = await call(A, 'GET', `/v1/migrations${query}`);
    const error = r.body['error'] as { code: string; field: string; message: string };
    assert.deepEqual([r.status, error.code, error.field], [400, 'ERR_LIVEMIG_INVALID_ARGUMENT', field], query);
    if (field === 'since') assert.match(error.message, /'since' must be an RFC 3339 time with its offset/);
  }

  // the sequence goes on after the earlier run's: a new event's id is above every one before
  await refusedSource(a.port);
  await until('the second refusal is listed', async () => (await list(A, '?state=refused')).length === 2);
  const fresh = (await list(A, '?state=refused')).at(-1)!;
  const [state] = await events(A, fresh.id);
  assert.ok(Number(state!.id) > Math.max(...before.map((e) => Number(e.id))), `${state!.id} follows the earlier run's ids`);
  const health = (await request<{ history: Record<string, unknown> }>(A, 'GET', '/v1/health')).body.history;
  assert.deepEqual([health['file'], health['restored'], health['interrupted'], health['write_failures']], [path.join(dir, 'history.db'), 2, 0, 0]);
});

test('a daemon killed during a migration: started again, it lists that migration failed, ERR_LIVEMIG_DAEMON_STOPPED', { skip }, async () => {
  const dir = tmp('killed');
  let { d: a, api: A } = await daemon(dir);
  const { d: b, api: B } = await daemon(tmp('killed-b'));
  const g = await registerGuest(A, a.guests, 'k1', { size: 64 * MiB });
  pids.push(g.pid);
  // at 1 MiB/s its first round alone lasts many seconds: it runs when the daemon is killed
  const created = await request<{ id: string }>(A, 'POST', '/v1/migrations', { guest: 'k1', to: { host: '127.0.0.1', port: b.port }, bandwidth_mib_s: 1 });
  const id = created.body.id;
  await until('the migration is in pre-copy', async () => (await request<View>(A, 'GET', `/v1/migrations/${id}`)).body['stage'] === 'precopy');
  const exited = once(a.child, 'exit');
  process.kill(a.daemonPid, 'SIGKILL');
  await exited;

  ({ d: a, api: A } = await daemon(dir));
  const m = (await request<View>(A, 'GET', `/v1/migrations/${id}`)).body;
  const error = m['error'] as { code: string; phase: string; message: string };
  assert.deepEqual([m.state, error.code, error.phase], ['failed', 'ERR_LIVEMIG_DAEMON_STOPPED', 'precopy'], JSON.stringify(m));
  assert.match(error.message, /the daemon stopped during it .*ask the destination's daemon \(127\.0\.0\.1:\d+\)/);
  assert.ok(Date.parse(String(m['finished_at'])) >= Date.parse(String(m['started_at'])), 'finished when the history last heard of it');
  const replayed = await events(A, id);
  assert.deepEqual(
    replayed.slice(0, 3).map((e) => [e.event, e.data['stage'], e.data['state']]),
    [
      ['stage', 'connecting', undefined],
      ['state', 'connecting', 'running'],
      ['stage', 'precopy', undefined],
    ],
  );
  assert.ok(
    replayed.slice(3, -1).every((e) => e.event === 'round'),
    'then its rounds, if any, then the state the restart gave it',
  );
  assert.deepEqual([replayed.at(-1)!.data['state'], (replayed.at(-1)!.data['error'] as { code: string }).code], ['failed', 'ERR_LIVEMIG_DAEMON_STOPPED']);
  const health = (await request<{ history: Record<string, unknown> }>(A, 'GET', '/v1/health')).body.history;
  assert.deepEqual([health['restored'], health['interrupted']], [1, 1]);
  // and what the file holds now is final: a second restart finds nothing unfinished
  assert.equal(await a.stop(), 0);
  const third = await daemon(dir);
  const health2 = (await request<{ history: Record<string, unknown> }>(third.api, 'GET', '/v1/health')).body.history;
  assert.deepEqual([health2['restored'], health2['interrupted']], [1, 0]);
  await destinationGuests(B);
});

test('the bounds: the oldest migrations and each one’s oldest events are pruned, in the file too', { skip }, async () => {
  const dir = tmp('bounds');
  const bounds = ['--history-migrations', '2', '--history-events', '2'];
  let { d: a, api: A } = await daemon(dir, bounds);
  const g = await registerGuest(A, a.guests, 'p1', { size: 16 * MiB });
  pids.push(g.pid);
  const nowhere = await closedPort();
  const ids: string[] = [];
  for (let i = 0; i < 3; i++) {
    // refused before any page moved: the guest runs on here, and may go again
    const r = await call(A, 'POST', '/v1/migrations', { guest: 'p1', to: { host: '127.0.0.1', port: nowhere } });
    assert.deepEqual([r.status, (r.body['error'] as { code: string }).code], [502, 'ERR_LIVEMIG_CONNECTION']);
    ids.push(String(r.body['id']));
  }
  assert.deepEqual(
    (await list(A)).map((m) => m.id),
    ids.slice(1),
    'the newest two',
  );
  assert.equal(await a.stop(), 0);

  const db = new Database(path.join(dir, 'history.db'), { readonly: true, fileMustExist: true });
  try {
    const rows = db.prepare('SELECT id, state, error_code FROM migrations ORDER BY seq').all();
    assert.deepEqual(rows, [
      { id: ids[1], state: 'failed', error_code: 'ERR_LIVEMIG_CONNECTION' },
      { id: ids[2], state: 'failed', error_code: 'ERR_LIVEMIG_CONNECTION' },
    ]);
    const kept = db.prepare('SELECT migration, type FROM events ORDER BY id').all() as { migration: string; type: string }[];
    assert.deepEqual(
      kept.map((e) => [e.migration, e.type]),
      ids.slice(1).flatMap((id) => [
        [id, 'state'],
        [id, 'state'],
      ]),
      'each keeps its newest two events: running, failed',
    );
  } finally {
    db.close();
  }

  ({ d: a, api: A } = await daemon(dir, bounds));
  assert.deepEqual(
    (await list(A)).map((m) => m.id),
    ids.slice(1),
  );
  assert.equal((await call(A, 'GET', `/v1/migrations/${ids[0]}`)).status, 404, 'the oldest is gone');
  const replayed = await events(A, ids[2]!);
  assert.deepEqual(
    replayed.map((e) => e.data['state']),
    ['running', 'failed'],
  );
  // a restart with a smaller bound prunes at once
  assert.equal(await a.stop(), 0);
  const smaller = await daemon(dir, ['--history-migrations', '1']);
  assert.deepEqual(
    (await list(smaller.api)).map((m) => m.id),
    ids.slice(2),
  );
});

test('a history file the daemon cannot use: it does not start, and ERR_LIVEMIG_HISTORY says why and what to do', async () => {
  const serve = (dir: string, more: string[] = []) =>
    spawnSync(
      process.execPath,
      [CLI, 'serve', '--api', `unix:${path.join(dir, 'api.sock')}`, '--guests', path.join(dir, 'guests.sock'), '--listen', '127.0.0.1:0', ...more],
      { encoding: 'utf8', timeout: 60_000 },
    );
  // damaged (here: not SQLite at all): kept as it is for whoever looks into it
  const damaged = tmp('damaged');
  const junk = Buffer.alloc(8192, 0x5a);
  writeFileSync(path.join(damaged, 'history.db'), junk);
  const r1 = serve(damaged);
  assert.equal(r1.status, 1, r1.stderr);
  assert.match(r1.stderr, /ERR_LIVEMIG_HISTORY \(history\): the migration history \S+history\.db: opening it failed \(SQLITE_NOTADB: .*Move it away/);
  assert.equal(r1.stdout, '', 'it never served');
  assert.deepEqual(readFileSync(path.join(damaged, 'history.db')), junk, 'the file is left as it was');

  // not a file it can open (here: a directory in its place)
  const blocked = tmp('blocked');
  mkdirSync(path.join(blocked, 'history.db'));
  const r2 = serve(blocked);
  assert.equal(r2.status, 1, r2.stderr);
  assert.match(r2.stderr, /ERR_LIVEMIG_HISTORY \(history\): the migration history \S+history\.db: .*give --state-dir a directory this daemon can write/);

  // held by another daemon
  const first = await daemon(tmp('held'));
  const r3 = serve(tmp('held-2'), ['--state-dir', path.dirname(first.d.socketPath)]);
  assert.equal(r3.status, 1, r3.stderr);
  assert.match(r3.stderr, /ERR_LIVEMIG_HISTORY \(history\): .*another process holds it \(each daemon needs a --state-dir of its own\)/);
  assert.equal((await request(first.api, 'GET', '/v1/health')).status, 200, 'the first daemon serves on');

  const r4 = serve(tmp('bound'), ['--history-migrations', '0']);
  assert.equal(r4.status, 2);
  assert.match(r4.stderr, /--history-migrations must be an integer in 1\.\.100000, got '0'/);
});
