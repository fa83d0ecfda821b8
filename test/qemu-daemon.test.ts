/**
 * A QEMU VM through the daemon (issue 34): registered by its QMP socket over the authenticated
 * API, listed with its kind, size, tracking and state, refused with the adapter's own words when
 * its RAM is not a shared file, migrated daemon to daemon (the destination daemon starting the
 * operator's QEMU command) with its check passing and its heartbeats going on there, and a
 * cancel leaving it running. A request without the token can neither register nor migrate.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createServer } from 'node:net';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { qemuCommand } from '../src/cli/qemu-exec.js';
import { followEvents, type ApiTarget, type StreamEvent } from '../src/daemon/client.js';
import { Daemon } from '../src/daemon/daemon.js';
import { QEMU, Serial, SourceVm, qemuUnavailable, vmArgs, vmStatus } from '../src/demo/qemu-vm.js';
import { QemuSource } from '../src/vmm/qemu/source.js';
import { referenceIncomingCommand } from '../src/workload/controller.js';
import { alive, call, metricsText, scratch, settled } from './daemon-helpers.js';

const unavailable = qemuUnavailable();
if (unavailable) console.log(`# QEMU daemon tests skipped: ${unavailable}`);

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const TOKEN = 'qemu-daemon-test-token-0123456789';
const MiB = 1 << 20;
const { tmp, pids } = scratch('livemig-qemu-daemon');

type Json = Record<string, unknown>;

async function daemonAt(tag: string, extra: { qemuCommand?: string[] } = {}): Promise<{ daemon: Daemon; api: ApiTarget; dir: string }> {
  const dir = tmp(tag);
  const daemon = await Daemon.start({
    api: { path: path.join(dir, 'api.sock') },
    token: TOKEN,
    listen: { host: '127.0.0.1', port: 0 },
    guests: path.join(dir, 'guests.sock'),
    guestCommand: referenceIncomingCommand(),
    ...extra,
  });
  return { daemon, api: { socketPath: path.join(dir, 'api.sock'), token: TOKEN }, dir };
}

/** `livemig guests ...` against the daemon at `api`: its exit code and stdout. */
async function guestsCli(dir: string, args: string[]): Promise<{ code: number; out: string }> {
  const tokenFile = path.join(dir, 'token');
  if (!existsSync(tokenFile)) writeFileSync(tokenFile, TOKEN, { mode: 0o600 });
  try {
    const { stdout } = await promisify(execFile)(process.execPath, [
      CLI,
      'guests',
      '--api',
      `unix:${path.join(dir, 'api.sock')}`,
      '--token-file',
      tokenFile,
      ...args,
    ]);
    return { code: 0, out: stdout };
  } catch (e) {
    const err = e as { code?: number; stdout?: string; stderr?: string };
    return { code: err.code ?? -1, out: `${err.stdout ?? ''}${err.stderr ?? ''}` };
  }
}

test('serve --qemu-exec takes a command that names its RAM file {memory}, and no other guest command', async () => {
  const serve = async (args: string[]): Promise<{ code: number; err: string }> => {
    try {
      await promisify(execFile)(process.execPath, [CLI, 'serve', ...args]);
      return { code: 0, err: '' };
    } catch (e) {
      return { code: (e as { code: number }).code, err: String((e as { stderr?: string }).stderr) };
    }
  };
  const noMemory = await serve(['--qemu-exec', 'qemu-system-x86_64 -m 1G']);
  assert.equal(noMemory.code, 2);
  assert.match(noMemory.err, /\{memory\}/);
  const both = await serve(['--qemu-exec', 'qemu-system-x86_64 -object memory-backend-file,mem-path={memory}', '--guest-exec', 'x {socket}']);
  assert.equal(both.code, 2);
  assert.match(both.err, /not with --guest-exec/);
});

describe('a QEMU VM through the daemon', { skip: unavailable ?? false }, () => {
  let vm: SourceVm;
  let to: { line: string; serial: string };
  let a: { daemon: Daemon; api: ApiTarget; dir: string };
  let b: { daemon: Daemon; api: ApiTarget; dir: string };
  const noToken = (t: ApiTarget): ApiTarget => ({ socketPath: (t as { socketPath: string }).socketPath });

  before(async () => {
    vm = await SourceVm.boot();
    // the destination's command is the operator's, set when its daemon starts (serve --qemu-exec)
    to = vm.destination();
    a = await daemonAt('a');
    b = await daemonAt('b', { qemuCommand: qemuCommand(to.line) });
  });
  after(async () => {
    await a?.daemon.shutdown();
    await b?.daemon.shutdown();
    vm?.cleanup();
  });

  test('a VM registered by its QMP socket is listed with its kind, memory, tracking and state; it runs on untouched', async () => {
    const reg = await call(a.api, 'POST', '/v1/guests', { name: 'vm1', qemu: { qmp: vm.qmp } });
    assert.equal(reg.status, 201, JSON.stringify(reg.body));
    const { body } = await call(a.api, 'GET', '/v1/guests');
    const listed = (body['guests'] as Json[]).find((g) => g['name'] === 'vm1');
    assert.ok(listed, JSON.stringify(body));
    assert.equal(listed['kind'], 'qemu');
    assert.equal(listed['pid'], vm.child.pid);
    assert.equal(listed['state'], 'idle');
    assert.equal(listed['bytes'], 256 * MiB);
    // no preload library in this QEMU: its pages are hashed, and the reason says so
    assert.equal(listed['tracking'], 'none');
    const qemu = listed['qemu'] as Json;
    assert.equal(qemu['qmp'], vm.qmp);
    assert.equal(qemu['ram'], vm.ram);
    assert.match(String(qemu['tracking_reason']), /^hash: /);
    // the registration let go: QMP answers others again, and QEMU's migration settings are its own
    assert.deepEqual(await vmStatus(vm.qmp), { status: 'running', ignoreShared: false });
    await vm.serial.beatsAfter(vm.serial.lastSeq + 3);

    const twice = await call(a.api, 'POST', '/v1/guests', { name: 'vm1-again', qemu: { qmp: vm.qmp } });
    assert.equal(twice.status, 409);
    assert.equal((twice.body['error'] as Json)['code'], 'ERR_LIVEMIG_CONFLICT');
    const relative = await call(a.api, 'POST', '/v1/guests', { name: 'vm2', qemu: { qmp: 'vm.qmp' } });
    assert.equal(relative.status, 400);
    assert.equal((relative.body['error'] as Json)['field'], 'qemu.qmp');
    const dotted = await call(a.api, 'POST', '/v1/guests', { name: 'vm2', qemu: { qmp: `${vm.dir}/../${path.basename(vm.dir)}/qmp-src.sock` } });
    assert.equal(dotted.status, 400, JSON.stringify(dotted.body));
  });

  test('the CLI unregisters a QEMU VM and registers it again', async () => {
    const gone = await guestsCli(a.dir, ['--unregister', 'vm1', '--json']);
    assert.equal(gone.code, 0, gone.out);
    assert.equal((await call(a.api, 'GET', '/v1/guests/vm1')).status, 404);
    assert.equal(vm.running, true, 'an unregistered VM runs on');
    const back = await guestsCli(a.dir, ['--register', 'vm1', '--qemu', vm.qmp, '--json']);
    assert.equal(back.code, 0, back.out);
    assert.equal((JSON.parse(back.out) as Json)['kind'], 'qemu');
    const listing = await guestsCli(a.dir, []);
    assert.match(listing.out, /^vm1 .* 256 MiB in 1 region .*tracking none {2}qemu$/m);
  });

  test("a VM whose RAM is not a shared file is refused with the adapter's own words", async () => {
    const dir = tmp('noshare');
    const ram = `/dev/shm/${path.basename(dir)}-ram`;
    const qmp = path.join(dir, 'qmp.sock');
    const child = spawn(QEMU, [...vmArgs(dir, 'noshare', ram, {}, 'off'), '-qmp', `unix:${qmp},server=on,wait=off`], { stdio: 'ignore' });
    pids.push(child.pid!);
    try {
      for (let i = 0; !existsSync(qmp); i++) {
        assert.ok(i < 600 && child.exitCode === null, 'QEMU serves QMP');
        await new Promise((r) => setTimeout(r, 50));
      }
      const refused = await call(a.api, 'POST', '/v1/guests', { name: 'unshared', qemu: { qmp } });
      assert.equal(refused.status, 409);
      const error = refused.body['error'] as Json;
      assert.equal(error['code'], 'ERR_LIVEMIG_QEMU');
      assert.match(String(error['message']), /not shared \(share=off\).*memory-backend-file,.*share=on/);
      await assert.rejects(QemuSource.attach(qmp), (e: Error) => e.message === error['message']);
      assert.equal((await call(a.api, 'GET', '/v1/guests/unshared')).status, 404);
    } finally {
      child.kill('SIGKILL');
      rmSync(ram, { force: true });
    }
  });

  test('without the token nothing is registered or migrated', async () => {
    for (const api of [noToken(a.api), { ...noToken(a.api), token: 'not-the-token-0123456789' }]) {
      const reg = await call(api, 'POST', '/v1/guests', { name: 'intruder', qemu: { qmp: vm.qmp } });
      assert.equal(reg.status, 401);
      assert.equal((reg.body['error'] as Json)['code'], 'ERR_LIVEMIG_UNAUTHORIZED');
      const mig = await call(api, 'POST', '/v1/migrations', { guest: 'vm1', to: { host: '127.0.0.1', port: b.daemon.migrationPort } });
      assert.equal(mig.status, 401);
      const gone = await call(api, 'DELETE', '/v1/guests/vm1');
      assert.equal(gone.status, 401);
    }
    assert.equal((await call(a.api, 'GET', '/v1/guests/intruder')).status, 404);
    assert.equal(((await call(a.api, 'GET', '/v1/migrations')).body['migrations'] as Json[]).length, 0);
    assert.equal(((await call(a.api, 'GET', '/v1/guests/vm1')).body as Json)['state'], 'idle');
  });

  test('a socket that is not QMP is refused, and what it said is not echoed to the caller', async () => {
    const socket = path.join(tmp('notqmp'), 'other.sock');
    const server = createServer((c) => c.end('{"secret": "not for the API caller"}\n'));
    await new Promise<void>((resolve) => server.listen(socket, resolve));
    try {
      const r = await call(a.api, 'POST', '/v1/guests', { name: 'other', qemu: { qmp: socket } });
      assert.equal(r.status, 409);
      assert.match(String((r.body['error'] as Json)['message']), /is not a QMP socket/);
      assert.doesNotMatch(JSON.stringify(r.body), /secret/);
    } finally {
      server.close();
    }
  });

  test('a cancel in the middle of the copy leaves the VM running here, registered and its own', async () => {
    const started = await call(a.api, 'POST', '/v1/migrations', { guest: 'vm1', to: { host: '127.0.0.1', port: b.daemon.migrationPort }, bandwidth_mib_s: 8 });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const id = String(started.body['id']);
    for (;;) {
      const { body } = await call(a.api, 'GET', `/v1/migrations/${id}`);
      assert.equal(body['state'], 'running', JSON.stringify(body).slice(0, 400));
      if (Number((body['progress'] as Json)['transferred_bytes']) > 0) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal((await call(a.api, 'POST', `/v1/migrations/${id}/cancel`)).status, 202);
    const end = await settled(a.api, id);
    assert.equal(end['state'], 'cancelled');
    assert.equal(end['source_guest'], 'running');
    assert.equal(((await call(a.api, 'GET', '/v1/guests/vm1')).body as Json)['state'], 'idle');
    await vm.serial.beatsAfter(vm.serial.lastSeq + 5);
    assert.deepEqual(await vmStatus(vm.qmp), { status: 'running', ignoreShared: false });
  });

  test('a registered VM moves live daemon to daemon: its check passes at the destination, where its heartbeats go on', async () => {
    const started = await call(a.api, 'POST', '/v1/migrations', { guest: 'vm1', to: { host: '127.0.0.1', port: b.daemon.migrationPort } });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const id = String(started.body['id']);
    // the destination QEMU serves its port from its start: heard from the first beat on
    const destination = new Serial();
    const heard = destination.attach(to.serial, 120_000);
    heard.catch(() => undefined); // awaited below, once the migration ended
    try {
      const end = await settled(a.api, id);
      assert.equal(end['state'], 'completed', JSON.stringify(end['error']));
      const report = end['report'] as Json;
      assert.equal(report['tracker'], 'hash');
      assert.ok((end['rounds'] as unknown[]).length >= 1);
      assert.equal((end['progress'] as Json)['percent'], 100);

      const incoming = (await call(b.api, 'GET', '/v1/migrations?direction=incoming&state=completed')).body['migrations'] as Json[];
      assert.equal(incoming.length, 1);
      assert.equal(incoming[0]!['guest'], 'vm1');
      const arrived = (await call(b.api, 'GET', `/v1/migrations/${String(incoming[0]!['id'])}`)).body;
      const qemuPid = Number(arrived['guest_pid']);
      assert.ok(qemuPid > 0 && alive(qemuPid), `the destination QEMU runs (pid ${qemuPid})`);
      pids.push(qemuPid);

      await heard;
      await destination.beatsAfter(vm.serial.lastSeq + 5, 60_000);
      assert.deepEqual(await destination.check(), { pages: 16384, bad: 0, firstBad: -1 });

      await new Promise((r) => (vm.child.exitCode !== null || vm.child.signalCode !== null ? r(undefined) : vm.child.once('exit', r)));
      assert.equal(vm.running, false, 'the source QEMU quit');
      assert.equal((await call(a.api, 'GET', '/v1/guests/vm1')).status, 404);

      // its events and metrics, as any guest's
      const events: StreamEvent[] = [];
      await followEvents(a.api, `/v1/migrations/${id}/events`, (e) => void events.push(e));
      const stages = events.filter((e) => e.event === 'stage').map((e) => e.data['stage']);
      assert.deepEqual(
        stages.filter((s) => ['precopy', 'stop-and-copy', 'activated', 'done'].includes(String(s))),
        ['precopy', 'stop-and-copy', 'activated', 'done'],
      );
      assert.ok(events.some((e) => e.event === 'round'));
      assert.ok(events.some((e) => e.event === 'report'));
      assert.match(await metricsText(a.api), /livemig_migrations_total\{direction="outgoing",state="completed"\} 1/);
    } finally {
      destination.close();
    }
  });
});

describe('a QEMU VM through the daemon by post-copy', { skip: unavailable ?? false }, () => {
  let vm: SourceVm;
  let to: { line: string; serial: string };
  let a: { daemon: Daemon; api: ApiTarget; dir: string };
  let b: { daemon: Daemon; api: ApiTarget; dir: string };
  before(async () => {
    vm = await SourceVm.boot();
    to = vm.destination();
    a = await daemonAt('pa');
    b = await daemonAt('pb', { qemuCommand: qemuCommand(to.line) });
  });
  after(async () => {
    await a?.daemon.shutdown();
    await b?.daemon.shutdown();
    vm?.cleanup();
  });

  test('mode postcopy: the VM runs at the destination before its RAM is all there; its check passes', async () => {
    assert.equal((await call(a.api, 'POST', '/v1/guests', { name: 'vm1', qemu: { qmp: vm.qmp } })).status, 201);
    const started = await call(a.api, 'POST', '/v1/migrations', { guest: 'vm1', to: { host: '127.0.0.1', port: b.daemon.migrationPort }, mode: 'postcopy' });
    assert.equal(started.status, 201, JSON.stringify(started.body));
    const destination = new Serial();
    const heard = destination.attach(to.serial, 120_000);
    heard.catch(() => undefined);
    try {
      const end = await settled(a.api, String(started.body['id']));
      assert.equal(end['state'], 'completed', JSON.stringify(end['error']));
      assert.equal((end['report'] as Json)['mode'], 'postcopy');
      const incoming = (await call(b.api, 'GET', '/v1/migrations?direction=incoming&state=completed')).body['migrations'] as Json[];
      const arrived = (await call(b.api, 'GET', `/v1/migrations/${String(incoming[0]!['id'])}`)).body;
      pids.push(Number(arrived['guest_pid']));
      await heard;
      await destination.beatsAfter(vm.serial.lastSeq + 5, 60_000);
      assert.deepEqual(await destination.check(), { pages: 16384, bad: 0, firstBad: -1 });
    } finally {
      destination.close();
    }
  });
});
