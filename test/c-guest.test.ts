/**
 * Real guests through the contract: the C example guest (two regions, native/guest/example)
 * migrates bit-identical in every mode while it writes, a guest without tracking is hashed and
 * the report says so, a guest already running is migrated from the CLI, and a same-host
 * upgrade moves no page at all. Each destination guest checks every page itself.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { runDemo } from '../src/demo/demo.js';
import { probe } from '../src/tracking/probe.js';
import { HeartbeatObserver, cGuestArgs, cGuestPath, cIncomingCommand } from '../src/workload/controller.js';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const guest = { size: 64 << 20, content: 'mixed', rate: 64, pattern: 'uniform', hotSize: 64 << 20 } as const;

test('the C example guest is built by npm install', () => {
  assert.ok(existsSync(cGuestPath), `${cGuestPath} exists`);
});

for (const mode of ['precopy', 'postcopy', 'hybrid'] as const) {
  test(`the C guest's two regions migrate bit-identical in ${mode} mode while it writes`, { skip: uffd.available ? false : uffd.reason }, async () => {
    const r = await runDemo({ guest, guestKind: 'c', policy: mode === 'precopy' ? {} : { mode } });
    assert.equal(r.verified, true);
    assert.equal(r.guest_verified.bad, 0, `first bad page ${r.guest_verified.first_bad}`);
    assert.ok(BigInt(r.guest_verified.writes) > 0n, 'it wrote while migrating');
    assert.deepEqual(
      r.regions.map((x) => [x.name, x.bytes]),
      [
        ['ram-low', 192 << 20],
        ['ram-high', 64 << 20],
      ],
    );
    assert.equal(r.tracker, mode === 'postcopy' ? r.tracker : 'uffd-async');
    if (mode !== 'postcopy') for (const x of r.regions) assert.ok(x.pages_sent >= x.bytes / 4096, `every page of ${x.name} went at least once`);
    if (mode !== 'precopy') assert.equal(r.postcopy!.pages_needed > 0, true, 'pages followed the guest');
  });
}

/** A receiver (CLI) and a guest already running, migrated with `livemig send --guest`. */
async function sendRunning(startGuest: (socket: string, heartbeat: string) => string[], receiverArgs: string[], sendArgs: string[] = []) {
  const observer = await HeartbeatObserver.start();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-running-'));
  const socket = path.join(dir, 'guest.sock');
  const argv = startGuest(socket, observer.address);
  const g = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const rx = spawn(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0', ...receiverArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
  const rxLines = createInterface({ input: rx.stdout! })[Symbol.asyncIterator]();
  let destPid = 0;
  try {
    // the guest says it serves once its memory is filled
    const ready = JSON.parse((await createInterface({ input: g.stdout! })[Symbol.asyncIterator]().next()).value as string) as { guest: { pid: number } };
    const { port } = JSON.parse((await rxLines.next()).value as string) as { port: number };
    await observer.waitFor((b) => b.pid === ready.guest.pid, 10_000); // it runs before anything moves
    const send = spawn(process.execPath, [CLI, 'send', '--guest', socket, '--to', `127.0.0.1:${port}`, '--json', ...sendArgs], { stdio: ['ignore', 'pipe', 'inherit'] });
    const report = JSON.parse((await createInterface({ input: send.stdout! })[Symbol.asyncIterator]().next()).value as string) as Record<string, unknown> & { regions: { pages_sent: number }[] };
    let line = JSON.parse((await rxLines.next()).value as string) as { guest_pid?: number; receiving?: unknown };
    while (line.receiving) line = JSON.parse((await rxLines.next()).value as string) as typeof line;
    destPid = line.guest_pid ?? 0;
    assert.ok(destPid > 0, JSON.stringify(line));
    const verify = await observer.waitFor((b) => b.pid === destPid && b.verify !== undefined, 60_000);
    await waitExit(g, 5000);
    return { report, verify: verify.verify!, sourceExit: g.exitCode };
  } finally {
    for (const p of [g, rx]) if (p.exitCode === null) p.kill('SIGKILL');
    if (destPid) killQuietly(destPid);
    observer.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone already
  }
}

async function waitExit(p: ChildProcess, ms: number): Promise<void> {
  for (let i = 0; i < ms / 10 && p.exitCode === null && p.signalCode === null; i++) await new Promise((r) => setTimeout(r, 10));
}

test('send --guest migrates an already-running C guest; without tracking it is hashed, and the report says so', async () => {
  const r = await sendRunning((socket, hb) => cGuestArgs(socket, { rate: 64, heartbeat: hb, noTrack: true }), ['--guest-exec', cIncomingCommand().join(' ')]);
  assert.equal(r.report.verified, true);
  assert.equal(r.report.tracker, 'hash');
  assert.match(String(r.report.tracker_reason), /registered no write tracking/);
  assert.equal(r.report.regions.length, 2);
  assert.equal(r.verify.bad, 0);
  assert.equal(r.sourceExit, 0, 'the source guest exited once it ran at the destination');
});

test('send --guest migrates an already-running reference guest (livemig guest)', { skip: uffd.available ? false : uffd.reason }, async () => {
  const r = await sendRunning((socket, hb) => [process.execPath, CLI, 'guest', '--socket', socket, '--size', '64MiB', '--heartbeat', hb], []);
  assert.equal(r.report.verified, true);
  assert.equal(r.report.tracker, 'uffd-async');
  assert.equal(r.verify.bad, 0);
});

test('send --guest --local hands an already-running C guest its memory with no page on the wire', async () => {
  const r = await sendRunning((socket, hb) => cGuestArgs(socket, { rate: 64, heartbeat: hb }), ['--guest-exec', cIncomingCommand().join(' ')], ['--local']);
  assert.equal(r.report.local, true);
  assert.equal(r.report.pages_sent, 0);
  assert.equal(r.report.tracker, 'shared');
  assert.equal(r.verify.bad, 0, 'the guest found every page intact');
});

for (const kind of ['reference', 'c'] as const) {
  test(`demo --local (${kind} guest): the memory stays intact, checked by the guest, with zero pages on the wire`, async () => {
    const r = await runDemo({ guest, guestKind: kind, local: true });
    assert.equal(r.local, true);
    assert.equal(r.pages_sent, 0);
    assert.ok(r.wire_bytes < 64 * 1024, `only control frames and the device state: ${r.wire_bytes} bytes`);
    assert.equal(r.verified, true);
    assert.equal(r.guest_verified.bad, 0);
  });
}
