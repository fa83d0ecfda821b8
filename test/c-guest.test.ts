/**
 * Real guests through the contract: the C example guest (two regions, native/guest/example)
 * migrates bit-identical in every mode while it writes, a guest without tracking is hashed and
 * the report says so, a guest already running is migrated from the CLI, and a same-host
 * upgrade moves no page at all. Each destination guest checks every page itself. The C
 * library's lifecycle (native/guest/test/lmg_lifecycle.c): stopped and started again on one
 * path, re-registered with a daemon under another name, its contract and ops versions.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { GuestRegistry } from '../src/daemon/registry.js';
import { runDemo } from '../src/demo/demo.js';
import { GUEST_CONTRACT, GUEST_CONTRACT_OLDEST, Tag } from '../src/guest/contract.js';
import { SourceGuestSession } from '../src/guest/source-session.js';
import { addon } from '../src/native.js';
import { processRef, signalProcess, type ProcessRef } from '../src/process-ref.js';
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

for (const mode of ['precopy', 'hybrid'] as const) {
  const title = `the C guest with --sparse (${mode}): its holes are neither read nor sent, and every page checks out`;
  test(title, { skip: uffd.available ? false : uffd.reason }, async () => {
    const r = await runDemo({ guest: { ...guest, content: 'sparse', rate: 4 }, guestKind: 'c', policy: mode === 'precopy' ? {} : { mode } });
    assert.equal(r.guest_verified.bad, 0, `first bad page ${r.guest_verified.first_bad}`);
    const pages = r.region_bytes / 4096;
    assert.ok(r.hole_pages > pages / 2, `${r.hole_pages} of ${pages} pages are holes`);
    // the source's memory grew only by the pages the guest wrote (whole pages, one per write)
    const grew = (r.source_memory.held_at_release_bytes - r.source_memory.held_before_bytes) / 4096;
    assert.ok(grew <= Number(r.guest_verified.writes), `the source allocated ${grew} pages; the guest wrote ${r.guest_verified.writes} times`);
    assert.ok(r.source_memory.held_before_bytes < r.region_bytes / 4, `the sparse guest holds ${r.source_memory.held_before_bytes} bytes`);
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
  let dest: ProcessRef | undefined;
  try {
    // the guest says it serves once its memory is filled
    const ready = JSON.parse((await createInterface({ input: g.stdout! })[Symbol.asyncIterator]().next()).value as string) as { guest: { pid: number } };
    const { port } = JSON.parse((await rxLines.next()).value as string) as { port: number };
    await observer.waitFor((b) => b.pid === ready.guest.pid, 10_000); // it runs before anything moves
    const send = spawn(process.execPath, [CLI, 'send', '--guest', socket, '--to', `127.0.0.1:${port}`, '--json', ...sendArgs], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const report = JSON.parse((await createInterface({ input: send.stdout! })[Symbol.asyncIterator]().next()).value as string) as Record<string, unknown> & {
      regions: { pages_sent: number }[];
    };
    let line = JSON.parse((await rxLines.next()).value as string) as { guest_pid?: number; receiving?: unknown };
    while (line.receiving) line = JSON.parse((await rxLines.next()).value as string) as typeof line;
    destPid = line.guest_pid ?? 0;
    assert.ok(destPid > 0, JSON.stringify(line));
    dest = processRef(destPid);
    const verify = await observer.waitFor((b) => b.pid === destPid && b.verify !== undefined, 60_000);
    await waitExit(g, 5000);
    return { report, verify: verify.verify!, sourceExit: g.exitCode };
  } finally {
    for (const p of [g, rx]) if (p.exitCode === null) p.kill('SIGKILL');
    if (dest) signalProcess(dest, 'SIGKILL');
    observer.close();
    rmSync(dir, { recursive: true, force: true });
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

const LIFECYCLE = fileURLToPath(new URL('../../build/Release/lmg_lifecycle', import.meta.url));
const STOPPED = { running: 0, committed: 1, released: 2 } as const; // LMG_STOPPED*

/** The C library driven a call at a time: each call's answer, and the callbacks it made meanwhile, in order. */
class LibraryDriver {
  readonly child: ChildProcess;
  readonly events: Record<string, unknown>[] = [];
  readonly dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-lifecycle-'));
  readonly #lines: AsyncIterator<string>;

  constructor() {
    this.child = spawn(LIFECYCLE, [], { stdio: ['pipe', 'pipe', 'inherit'] });
    this.#lines = createInterface({ input: this.child.stdout! })[Symbol.asyncIterator]();
  }

  get eventNames(): unknown[] {
    return this.events.map((e) => e.event);
  }

  async call(command: string): Promise<Record<string, unknown>> {
    this.child.stdin!.write(`${command}\n`);
    for (;;) {
      const { value, done } = await this.#lines.next();
      if (done) throw new Error(`the driver ended (${String(this.child.exitCode ?? this.child.signalCode)}) before answering ${command}`);
      const line = JSON.parse(value as string) as Record<string, unknown>;
      if (line.event === undefined) return line;
      this.events.push(line);
    }
  }

  close(): void {
    this.child.kill('SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Waits for what a test needs, however loaded the machine; the bound only ends a test that would hang. */
async function until(what: string, ready: () => boolean): Promise<void> {
  for (let waited = 0; !ready(); waited += 20) {
    if (waited > 60_000) throw new Error(`${what}: not within 60 s`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n);
  return b;
};

test('the C library stops and serves again on the same path; a pause livemig did not commit ends with the stop, a committed one does not', async () => {
  const d = new LibraryDriver();
  const socket = path.join(d.dir, 'guest.sock');
  try {
    assert.deepEqual(await d.call('version'), { version: GUEST_CONTRACT, oldest: GUEST_CONTRACT_OLDEST, header: GUEST_CONTRACT });
    assert.deepEqual(await d.call(`start ${socket} vm-a`), { started: true });
    const first = await SourceGuestSession.connect(socket);
    assert.equal(first.hello.name, 'vm-a');
    const versions = [first.hello.helloContract, first.hello.contract];
    assert.deepEqual(versions, [GUEST_CONTRACT_OLDEST, GUEST_CONTRACT], 'the hello offered the newest, and livemig raised the session to it');
    assert.equal(first.pause().toString(), 'state-1');
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.running });
    assert.deepEqual(d.eventNames, ['pause', 'resume'], 'the pause ended before stop returned');
    assert.equal(existsSync(socket), false, 'the socket file it made is gone');
    assert.equal(first.gone, true, 'livemig sees the connection closed');
    first.close();

    assert.deepEqual(await d.call(`start ${socket} vm-a`), { started: true }, 'the same path is served again');
    const second = await SourceGuestSession.connect(socket);
    assert.equal(second.pause().toString(), 'state-2');
    await second.commit();
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.committed }, 'paused after the commitment: only livemig may end it');
    assert.deepEqual(d.eventNames, ['pause', 'resume', 'pause'], 'no resume after the commitment');
    assert.equal(existsSync(socket), false);
    second.close();
  } finally {
    d.close();
  }
});

test('the C library refuses a stop from its own callback (it would wait for itself) and serves on', async () => {
  const d = new LibraryDriver();
  const socket = path.join(d.dir, 'guest.sock');
  try {
    await d.call(`start ${socket} vm-a`);
    await d.call('stop-in-pause');
    const s = await SourceGuestSession.connect(socket);
    try {
      assert.equal(s.pause().toString(), 'state-1', 'the pause is answered as usual');
      s.resume();
    } finally {
      s.close();
    }
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.running }, 'the handle was still there to stop');
    assert.deepEqual(d.events[0], { event: 'stop-in-callback', result: -1, errno: os.constants.errno.EDEADLK });
    assert.deepEqual(d.eventNames.slice(1), ['pause', 'resume']);
  } finally {
    d.close();
  }
});

test("the C library's ops struct can grow: too small a size, or a field it does not know set, is refused", async () => {
  const d = new LibraryDriver();
  const socket = path.join(d.dir, 'guest.sock');
  try {
    const tooSmall = await d.call(`start ${socket} vm-a 0`);
    assert.match(String(tooSmall.error), /lmg_source_ops\.size is 0: set it to sizeof\(struct lmg_source_ops\)/);
    assert.equal(tooSmall.errno, os.constants.errno.EINVAL);
    const unknownField = await d.call(`start ${socket} vm-a 100 1`);
    assert.match(String(unknownField.error), new RegExp(`lmg_source_ops sets fields past the \\d+ bytes this library \\(contract ${GUEST_CONTRACT}\\) knows`));
    assert.equal(unknownField.errno, os.constants.errno.E2BIG);
    assert.equal(existsSync(socket), false, 'a refused start leaves nothing behind');
    assert.deepEqual(await d.call(`start ${socket} vm-a 100 0`), { started: true }, "a newer caller's struct, its new fields unset, is taken");
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.running });
  } finally {
    d.close();
  }
});

test('the C library agrees on a contract in its window, before any other request, and answers every refusal', async () => {
  const d = new LibraryDriver();
  const socket = path.join(d.dir, 'guest.sock');
  await d.call(`start ${socket} vm-a`);
  const fd = addon.unixConnect(socket);
  try {
    const hello = addon.controlReceive(fd, 10_000);
    for (const f of hello.fds) addon.closeFd(f);
    assert.equal(hello.tag, Tag.hello);
    const offered = JSON.parse(hello.body.toString()) as { contract: number; contractMax: number };
    assert.deepEqual([offered.contract, offered.contractMax], [GUEST_CONTRACT_OLDEST, GUEST_CONTRACT]);
    const ask = (tag: number, body?: Buffer) => addon.controlRequest(fd, tag, 10_000, body);
    const refusedWith = (r: { tag: number; body: Buffer }, re: RegExp) => {
      assert.equal(r.tag, Tag.error, `answered 0x${r.tag.toString(16)}`);
      assert.match(r.body.toString(), re);
    };
    refusedWith(ask(Tag.contract, u32(GUEST_CONTRACT + 1)), new RegExp(`contract ${GUEST_CONTRACT + 1} is outside this hello's 2\\.\\.${GUEST_CONTRACT}`));
    refusedWith(ask(Tag.contract, u32(GUEST_CONTRACT_OLDEST - 1)), /contract 1 is outside/);
    refusedWith(ask(Tag.contract, Buffer.of(3)), /a contract version is a u32, not 1 bytes/);
    assert.equal(ask(Tag.contract, u32(GUEST_CONTRACT_OLDEST)).tag, Tag.contractAgreed, 'the version before is spoken');
    assert.equal(ask(Tag.contract, u32(GUEST_CONTRACT)).tag, Tag.contractAgreed);
    refusedWith(ask(Tag.pause, Buffer.alloc(3)), /a pause carries nothing or a u32 lease, not 3 bytes/);
    assert.equal(ask(Tag.pause).tag, Tag.paused);
    refusedWith(ask(Tag.contract, u32(GUEST_CONTRACT)), /agreed first, before any other request/);
    assert.equal(ask(Tag.commit).tag, Tag.committed);
    refusedWith(ask(Tag.pause), /paused after livemig's commitment/);
    assert.equal(ask(Tag.release).tag, Tag.released);
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.released });
    assert.deepEqual(d.eventNames, ['pause', 'released']);
  } finally {
    addon.closeFd(fd);
    d.close();
  }
});

test('a VMM stops its registration with a daemon and registers again under another name', async () => {
  const d = new LibraryDriver();
  const registry = await GuestRegistry.open(path.join(d.dir, 'guests.sock'));
  const names = (): string[] => registry.list().map((g) => g.name);
  try {
    assert.deepEqual(await d.call(`register ${registry.path} vm-a`), { started: true });
    await until('vm-a registered', () => names().includes('vm-a'));
    assert.equal(registry.info('vm-a')!.pid, d.child.pid);
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.running });
    await until('vm-a gone from the daemon once its registration stopped', () => names().length === 0);
    assert.deepEqual(await d.call(`register ${registry.path} vm-b`), { started: true });
    await until('vm-b registered', () => names().length > 0);
    assert.deepEqual(names(), ['vm-b']);
    // the daemon migrates it on that connection: the library answers there
    const claimed = registry.claim('vm-b', 'test');
    if (claimed.kind !== 'contract') throw new Error(`vm-b was claimed as a ${claimed.kind} guest`);
    const s = claimed.session;
    assert.equal(s.hello.contract, GUEST_CONTRACT);
    assert.equal(s.pause().toString(), 'state-1');
    s.resume();
    registry.settle('vm-b', 'kept');
    assert.deepEqual(await d.call('stop'), { stopped: STOPPED.running });
    assert.deepEqual(d.eventNames, ['pause', 'resume']);
  } finally {
    await registry.close();
    d.close();
  }
});
