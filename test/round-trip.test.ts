/**
 * A guest that arrived can leave again: through two `livemig serve` daemons, A→B→A with the
 * reference guest and with the C example guest, each arrival verified by the guest itself and
 * listed by the destination daemon under the guest's name; a destination refuses a second guest
 * of a name it lists; migrated-in guests outlive their daemon killed with its whole process
 * group, and register again with the daemon that comes back.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { request, type ApiTarget } from '../src/daemon/client.js';
import { DaemonProcess } from '../src/daemon/process.js';
import { probe } from '../src/tracking/probe.js';
import { HeartbeatObserver, cGuestPath, cIncomingCommand } from '../src/workload/controller.js';
import { alive, call, registerGuest, scratch, settled } from './daemon-helpers.js';
import { guestCheck, until } from './helpers.js';

const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const skip = uffd.available ? false : uffd.reason;
const MiB = 1 << 20;
const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

const { tmp, pids } = scratch('livemig-trip');

interface GuestView {
  name: string;
  pid: number;
  state: string;
  tracking: string;
}
const guestsOf = async (api: ApiTarget): Promise<GuestView[]> => (await request<{ guests: GuestView[] }>(api, 'GET', '/v1/guests')).body.guests;

/** Migrates `name` from `from` to the daemon at `port`; the arrival: its migration's view and the guest's pid there. */
async function move(from: ApiTarget, name: string, port: number): Promise<{ view: Record<string, unknown>; id: string }> {
  const created = await request<{ id: string }>(from, 'POST', '/v1/migrations', { guest: name, to: { host: '127.0.0.1', port } });
  const view = await settled(from, created.body.id);
  assert.equal(view['state'], 'completed', JSON.stringify(view['error']));
  return { view, id: created.body.id };
}

/** The migrated-in guest at `to`: its incoming record names it, it checks every page, and the daemon lists it by name (tracked). */
async function arrived(to: ApiTarget, name: string, observer: HeartbeatObserver, d: DaemonProcess): Promise<number> {
  const incoming = (await request<{ migrations: { guest: string; guest_pid?: number; state: string }[] }>(to, 'GET', '/v1/migrations?direction=incoming')).body
    .migrations;
  const m = incoming.filter((x) => x.guest === name && x.state === 'completed').at(-1);
  assert.ok(m?.guest_pid, `the destination recorded ${name}'s arrival under its name: ${JSON.stringify(incoming)}`);
  pids.push(m.guest_pid);
  assert.equal((await guestCheck({ pid: m.guest_pid, beats: () => observer.beats })).bad, 0, `${name} holds every page it wrote`);
  // it registers once its check is done: waited for by event (a bound, not a verdict on time)
  await until(`${name} listed at the destination`, async () => (await guestsOf(to)).some((g) => g.name === name && g.pid === m.guest_pid), 120_000).catch(
    (e: Error) => Promise.reject(new Error(`${e.message}; its log: ${guestLog(d, name)}`)),
  );
  const listed = (await guestsOf(to)).find((g) => g.name === name)!;
  assert.equal(listed.tracking, 'uffd-wp-async', 'it is tracked as it was at its source');
  return m.guest_pid;
}

/** What the daemon kept of the arrived guest's output. */
function guestLog(d: DaemonProcess, name: string): string {
  const dir = path.join(path.dirname(d.guests), 'guest-logs');
  return readdirSync(dir)
    .filter((f) => f.startsWith(`${name}-`))
    .map((f) => readFileSync(path.join(dir, f), 'utf8'))
    .join(' | ')
    .slice(-2000);
}

test('A→B→A with the reference guest: each arrival verified by the guest, listed under its name, the guest it left gone', { skip }, async () => {
  const observer = await HeartbeatObserver.start();
  const a = await DaemonProcess.start({ dir: tmp('a') });
  const b = await DaemonProcess.start({ dir: tmp('b') });
  const A: ApiTarget = { socketPath: a.socketPath };
  const B: ApiTarget = { socketPath: b.socketPath };
  try {
    const g = await registerGuest(A, a.guests, 'traveller', { size: 64 * MiB, rate: 8, heartbeat: observer.address });
    pids.push(g.pid);
    await move(A, 'traveller', b.port);
    const atB = await arrived(B, 'traveller', observer, b);
    assert.notEqual(atB, g.pid);
    await until('the source guest exits once released', () => !alive(g.pid));
    assert.ok(!(await guestsOf(A)).some((x) => x.name === 'traveller'), 'A lists it no more');
    assert.ok(
      readdirSync(path.join(path.dirname(b.guests), 'guest-logs')).some((f) => f.startsWith('traveller-')),
      "the daemon keeps the arrived guest's output in its guest-logs",
    );

    await move(B, 'traveller', a.port);
    const backAtA = await arrived(A, 'traveller', observer, a);
    await until('the guest B held exits once released', () => !alive(atB));
    assert.ok(!(await guestsOf(B)).some((x) => x.name === 'traveller'), 'B lists it no more');
    assert.ok(alive(backAtA));
  } finally {
    await a.stop();
    await b.stop();
    observer.close();
  }
});

test('a guest coming back to a daemon that kept its image (--keep-images) moves only what changed while it was gone', { skip }, async () => {
  const observer = await HeartbeatObserver.start();
  const a = await DaemonProcess.start({ dir: tmp('ka'), args: ['--keep-images', '256MiB'] });
  const b = await DaemonProcess.start({ dir: tmp('kb') });
  const A: ApiTarget = { socketPath: a.socketPath };
  try {
    // writes at 1 MiB/s fall on few of its 16384 pages while it is away
    const g = await registerGuest(A, a.guests, 'homing', { size: 64 * MiB, rate: 1, heartbeat: observer.address });
    pids.push(g.pid);
    const out = await move(A, 'homing', b.port);
    const pages = (64 * MiB) / 4096;
    // B held nothing of it: the only pages left out were resent after the first pass unchanged
    // (a write that came before their copy was read, reported dirty by the next collect)
    const first = out.view['report'] as { skipped_pages: number; pages_sent: number; per_round: { pages: number }[] };
    const resent = first.pages_sent - first.per_round[0]!.pages;
    assert.ok(first.skipped_pages <= resent, `B held nothing of it: ${first.skipped_pages} left out, ${resent} resent after the first pass`);
    await arrived({ socketPath: b.socketPath }, 'homing', observer, b);
    const back = await move({ socketPath: b.socketPath }, 'homing', a.port);
    const report = back.view['report'] as { skipped_pages: number; pages_sent: number };
    // A still held what it left with: those pages were not sent again
    assert.ok(report.skipped_pages > pages / 2, `pages already at A, not sent: ${report.skipped_pages} of ${pages}`);
    await arrived(A, 'homing', observer, a);
  } finally {
    await a.stop();
    await b.stop();
    observer.close();
  }
});

test(
  'A→B→A with the C example guest (--guest-exec with {register} and {name})',
  { skip: skip || (!existsSync(cGuestPath) && 'the C example guest is not built') },
  async () => {
    const observer = await HeartbeatObserver.start();
    const exec = ['--guest-exec', cIncomingCommand({ register: true }).join(' ')];
    const a = await DaemonProcess.start({ dir: tmp('ca'), args: exec });
    const b = await DaemonProcess.start({ dir: tmp('cb'), args: exec });
    const A: ApiTarget = { socketPath: a.socketPath };
    const B: ApiTarget = { socketPath: b.socketPath };
    try {
      const c = spawn(cGuestPath, ['--register', a.guests, '--name', 'c-traveller', '--sizes', '24M,8M', '--rate', '8', '--heartbeat', observer.address], {
        stdio: ['ignore', 'ignore', 'inherit'],
      });
      pids.push(c.pid!);
      await until('the C guest registers at A', async () => (await guestsOf(A)).some((x) => x.name === 'c-traveller'));
      await move(A, 'c-traveller', b.port);
      const atB = await arrived(B, 'c-traveller', observer, b);
      await move(B, 'c-traveller', a.port);
      await arrived(A, 'c-traveller', observer, a);
      await until('the C guest B held exits once released', () => !alive(atB));
    } finally {
      await a.stop();
      await b.stop();
      observer.close();
    }
  },
);

test('a destination that lists a guest of that name refuses another: ERR_LIVEMIG_CONFLICT, the source guest runs on', { skip }, async () => {
  const a = await DaemonProcess.start({ dir: tmp('da') });
  const b = await DaemonProcess.start({ dir: tmp('db') });
  const A: ApiTarget = { socketPath: a.socketPath };
  try {
    const here = await registerGuest(A, a.guests, 'twin', { size: 16 * MiB, rate: 0 });
    const there = await registerGuest({ socketPath: b.socketPath }, b.guests, 'twin', { size: 16 * MiB, rate: 0 });
    pids.push(here.pid, there.pid);
    // refused in the handshake, which POST waits for: the answer is the failure
    const refused = await call(A, 'POST', '/v1/migrations', { guest: 'twin', to: { host: '127.0.0.1', port: b.port } });
    const error = (refused.body['error'] ?? {}) as { code?: string; message?: string };
    assert.equal(error.code, 'ERR_LIVEMIG_REFUSED', JSON.stringify(refused.body));
    assert.match(String(error.message), /ERR_LIVEMIG_CONFLICT: a guest named twin is registered here/);
    assert.ok(alive(here.pid) && alive(there.pid), 'both guests run on');
    assert.ok(
      (await guestsOf(A)).some((x) => x.name === 'twin' && x.state === 'idle'),
      'the source lists its guest again',
    );
  } finally {
    await a.stop();
    await b.stop();
  }
});

test(
  "a migrated-in guest outlives its daemon killed with the daemon's whole process group, and registers with the daemon that comes back",
  { skip },
  async (t) => {
    if (!existsSync('/run/systemd/system'))
      t.diagnostic('systemd is not running here: the guests run in sessions of their own; their systemd scopes are not exercised');
    const observer = await HeartbeatObserver.start();
    const a = await DaemonProcess.start({ dir: tmp('ka') });
    const bDir = tmp('kb');
    const b = await DaemonProcess.start({ dir: bDir, ownGroup: true });
    const A: ApiTarget = { socketPath: a.socketPath };
    try {
      const g = await registerGuest(A, a.guests, 'survivor', { size: 32 * MiB, rate: 8, heartbeat: observer.address });
      pids.push(g.pid);
      await move(A, 'survivor', b.port);
      const pid = await arrived({ socketPath: b.socketPath }, 'survivor', observer, b);
      await b.killGroup('SIGKILL');
      assert.ok(alive(pid), 'the guest survived the kill of the daemon and its group');
      const killedAt = observer.beats.length;
      await until('the guest beats after its daemon died', () => observer.beats.slice(killedAt).some((x) => x.pid === pid));
      const back = await DaemonProcess.start({ dir: bDir });
      try {
        await until('the guest registers with the daemon that came back', async () =>
          (await guestsOf({ socketPath: back.socketPath })).some((x) => x.name === 'survivor' && x.pid === pid),
        );
        assert.equal((await guestCheck({ pid, beats: () => observer.beats, ask: true })).bad, 0, 'it still holds every page');
      } finally {
        await back.stop();
      }
    } finally {
      await a.stop();
      await b.stop();
      observer.close();
    }
  },
);

test('the systemd unit we ship: KillMode=mixed, a runtime directory kept across restarts, and an ExecStart that livemig serve takes', () => {
  const unit = readFileSync(fileURLToPath(new URL('../../contrib/systemd/livemig.service', import.meta.url)), 'utf8');
  const setting = (key: string): string | undefined => unit.match(new RegExp(`^${key}=(.*)$`, 'm'))?.[1];
  assert.equal(setting('KillMode'), 'mixed', 'control-group would stop the daemon and everything in its cgroup at once');
  assert.equal(setting('RuntimeDirectory'), 'livemig');
  assert.equal(setting('RuntimeDirectoryPreserve'), 'yes', 'the guest socket guests dial back to, and their logs, outlive a restart');
  const exec = setting('ExecStart')!.split(/\s+/);
  assert.match(exec[0]!, /\/livemig$/);
  assert.equal(exec[1], 'serve');
  const help = spawnSync(process.execPath, [CLI, 'serve', '--help'], { encoding: 'utf8' }).stdout;
  for (const flag of exec.filter((w) => w.startsWith('--'))) assert.ok(help.includes(`  ${flag} `), `serve takes ${flag}`);
  assert.ok(exec.includes('/run/livemig/guests.sock'), 'guests register inside the runtime directory');
  assert.equal(setting('StateDirectory'), 'livemig');
  assert.equal(exec[exec.indexOf('--state-dir') + 1], '/var/lib/livemig', 'the history outlives a reboot: in the state directory');
});
