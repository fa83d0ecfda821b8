/**
 * Admission against a hostile crowd and hostile keyed peers (issue 29): bytes after a first
 * frame are refused on the encrypted path as on the plain one; a crowd from the source's own
 * address does not stop a real migration; authenticated connections that never send a frame
 * hold no native thread (a receiver with a pool of 4 serves a migration while eight of them
 * wait); a bad same-host offer leaves `livemig receive` listening.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { LivemigError } from '../src/errors.js';
import { CAP_CHANNELS, CAP_COMMIT_ACTIVATE, CAP_LOCAL, FrameType, STRIPE_PAGES } from '../src/protocol/format.js';
import { decodeAccept, decodeError, encodeAttach, encodeHello, encodeRoundEnd } from '../src/protocol/messages.js';
import type { FramedConnection } from '../src/protocol/connection.js';
import { listen, type Receiver } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { secureConnect, type Credentials } from '../src/security/tls.js';
import { migrate } from '../src/source/migrate.js';
import { isRefusedBeforeReserving } from '../src/receiver/receiver.js';
import * as R from './reference/frames.js';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const key = randomBytes(32);
const SERVER: Credentials = { kind: 'psk', identity: 'src', key };
const CLIENT: Credentials = { kind: 'psk', identity: 'src', key };
const hello = (o: Partial<Parameters<typeof encodeHello>[0]> = {}): Buffer =>
  encodeHello({ versions: [3, 3], regionBytes: 64 * 4096, pageSize: 4096, auth: null, capabilities: [CAP_COMMIT_ACTIVATE], ...o });

async function keyedConnection(port: number): Promise<FramedConnection> {
  const raw = net.connect(port, '127.0.0.1');
  await new Promise<void>((r, j) => raw.once('connect', r).once('error', j));
  return (await secureConnect(raw, CLIENT, 5000)).conn;
}

/** A listener with a PSK that counts reservations; its first outcome, refused or not. */
async function keyedListener(): Promise<{ rx: Receiver; reserved: () => number; outcome: Promise<unknown> }> {
  let reserved = 0;
  const rx = await listen('127.0.0.1', 0, { credentials: SERVER, onReserved: () => void reserved++, activate: async () => undefined });
  const outcome = rx.next().then(
    (r) => r as unknown,
    (e: unknown) => e,
  );
  return { rx, reserved: () => reserved, outcome };
}

/** The next migration's report, past the refusals of strangers. */
async function nextMigration(rx: Receiver): Promise<Awaited<ReturnType<Receiver['next']>>> {
  for (;;) {
    try {
      return await rx.next();
    } catch (e) {
      if (!isRefusedBeforeReserving(e)) throw e;
    }
  }
}

const afterFirst = (e: unknown): boolean =>
  e instanceof LivemigError && e.code === 'ERR_LIVEMIG_PROTOCOL' && /came after the first frame/.test(e.message) && isRefusedBeforeReserving(e);

for (const [name, parts] of [
  ['HELLO and ROUND_END in one record', [hello(), encodeRoundEnd({ round: 1, pages: 0 }, 3)]],
  ['HELLO and 1 MiB in one write', [hello(), randomBytes(1 << 20)]],
] as const) {
  test(`encrypted: ${name} is refused before anything is reserved`, async () => {
    const { rx, reserved, outcome } = await keyedListener();
    try {
      const conn = await keyedConnection(rx.port);
      await conn.send([...parts]).catch(() => undefined); // the receiver may hang up mid-write
      const refusal = await Promise.race([outcome, new Promise((r) => setTimeout(() => r(new Error('no outcome within 20 s')), 20_000))]);
      assert.ok(afterFirst(refusal), `refused as bytes after the first frame: ${String(refusal)}`);
      assert.equal(reserved(), 0, 'nothing was reserved');
      await assert.rejects(conn.next(5000), 'the connection was closed, never answered');
      conn.close();
    } finally {
      await rx.close();
    }
  });
}

test('encrypted: an ATTACH to a real session with a PAGES frame in the same record is refused, and the page is not taken', async () => {
  let region: Region | undefined;
  const rx = await listen('127.0.0.1', 0, { credentials: SERVER, maxChannels: 2, onReserved: (r) => void (region = r), activate: async () => undefined });
  const outcome = rx.next().catch((e: unknown) => e);
  try {
    const main = await keyedConnection(rx.port);
    await main.send(hello({ regionBytes: 2 * STRIPE_PAGES * 4096, capabilities: [CAP_COMMIT_ACTIVATE, CAP_CHANNELS], channels: 2 }));
    const accept = decodeAccept((await main.next(10_000)).payload);
    assert.equal(accept.channels, 2, 'two channels granted: a session to attach to');
    const page = Buffer.alloc(R.pagesFrameBytes(1, 4096), 0xab);
    R.writePagesPrefix(page, 1, Uint32Array.from([STRIPE_PAGES]), 3); // a page of channel 1's stripe
    const extra = await keyedConnection(rx.port);
    await extra.send([encodeAttach({ session: accept.session!, role: 'channel', channel: 1 }, 3), page]).catch(() => undefined);
    await assert.rejects(extra.next(10_000), 'refused: never ATTACHED');
    extra.close();
    assert.ok(region, 'the region was reserved for the main connection');
    assert.ok(Buffer.from(region.page(STRIPE_PAGES)).equals(Buffer.alloc(4096)), 'the page that came with the ATTACH was not taken');
    main.close();
    await outcome;
  } finally {
    await rx.close();
  }
});

test('plain: HELLO and 1 MiB in one write is refused the same way, by the same rule', async () => {
  let reserved = 0;
  const rx = await listen('127.0.0.1', 0, { onReserved: () => void reserved++, activate: async () => undefined });
  const outcome = rx.next().then(
    () => undefined,
    (e: unknown) => e,
  );
  try {
    const s = net.connect(rx.port, '127.0.0.1');
    s.on('error', () => undefined);
    s.write(Buffer.concat([hello(), randomBytes(1 << 20)]));
    assert.ok(afterFirst(await outcome));
    assert.equal(reserved, 0);
    s.destroy();
  } finally {
    await rx.close();
  }
});

test("64 loops of one-byte connections from the source's own address do not stop a real keyed migration", async () => {
  const rx = await listen('127.0.0.1', 0, { credentials: SERVER, activate: async () => undefined });
  let stop = false;
  let crowdConnections = 0;
  let crowdClosedByReceiver = 0;
  const open = new Set<net.Socket>();
  const loop = async (): Promise<void> => {
    while (!stop) {
      const s = net.connect(rx.port, '127.0.0.1');
      open.add(s);
      s.on('error', () => undefined);
      s.once('connect', () => {
        crowdConnections++;
        s.write(Buffer.from([0x16])); // the first byte of a TLS record, and nothing more
      });
      await new Promise<void>((r) => s.once('close', () => r()));
      open.delete(s);
      if (!stop) crowdClosedByReceiver++;
    }
  };
  const crowd = Array.from({ length: 64 }, () => loop());
  const region = Region.create(16 << 20, { name: 'crowd-source' });
  try {
    // let the crowd fill every slot of the address first
    while (crowdConnections < 256) await new Promise((r) => setTimeout(r, 10));
    const outcome = nextMigration(rx);
    const report = await migrate({
      region,
      to: { host: '127.0.0.1', port: rx.port },
      credentials: CLIENT,
      pause: async () => new Uint8Array(4),
      resume: async () => undefined,
    });
    assert.equal(report.verified, true);
    assert.equal((await outcome).digest, report.digest);
    assert.ok(crowdClosedByReceiver > 0, 'the crowd was over the cap: some of it was let go');
  } finally {
    stop = true;
    for (const s of open) s.destroy();
    await Promise.all(crowd);
    region.release();
    await rx.close();
  }
});

/** Runs `livemig receive` with a PSK file and a pool of 4; resolves with its port and its lines. */
async function receiveChild(dir: string, extra: string[] = [], env: NodeJS.ProcessEnv = {}) {
  const psk = path.join(dir, 'k.psk');
  writeFileSync(psk, `src:${key.toString('hex')}\n`, { mode: 0o600 });
  const child = spawn(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0', '--psk-file', psk, ...extra], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, ...env },
  });
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
  const next = async (): Promise<Record<string, unknown>> => JSON.parse((await lines.next()).value as string) as Record<string, unknown>;
  return { child, port, psk, next };
}

function sendChild(port: number, psk: string): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const tx = spawn(process.execPath, [CLI, 'send', '--to', `127.0.0.1:${port}`, '--psk-file', psk, '--size', '32MiB', '--rate', '0', '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  tx.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  tx.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  // on exit, not close: a guest that a failed send leaves running keeps the pipe open; the
  // output is whole by then or the test fails on it (a short pause lets the pipe drain)
  return new Promise((resolve) => tx.once('exit', (status) => setTimeout(() => resolve({ status, stdout, stderr }), 200)));
}

function stopGuest(line: Record<string, unknown> | undefined): void {
  const pid = (line as { guest_pid?: number } | undefined)?.guest_pid;
  if (pid) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // already gone
    }
  }
}

test('eight silent authenticated connections hold no native thread: a receiver with a pool of 4 serves a migration while all of them still wait', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-silent-'));
  const rx = await receiveChild(dir, ['--handshake-timeout', '120'], { UV_THREADPOOL_SIZE: '4' });
  const silent: FramedConnection[] = [];
  let received: Record<string, unknown> | undefined;
  try {
    for (let i = 0; i < 8; i++) silent.push(await keyedConnection(rx.port));
    const tx = await sendChild(rx.port, rx.psk);
    assert.equal(tx.status, 0, tx.stderr);
    const report = JSON.parse(tx.stdout.trim().split('\n').at(-1)!) as { verified: boolean };
    assert.equal(report.verified, true);
    // had they held the pool, the migration could only have gone once they were closed (120 s)
    assert.deepEqual(
      silent.map((c) => c.peerGone()),
      Array(8).fill(false),
      'every silent connection is still open: none was waited out',
    );
    for (;;) {
      received = await rx.next();
      if (received['received']) break;
    }
  } finally {
    for (const c of silent) c.close();
    stopGuest(received);
    rx.child.kill();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a bad same-host offer (foreign boot id, missing socket, a file that is not a socket) is refused and `livemig receive` listens on', async () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-local-offer-'));
  const rx = await receiveChild(dir);
  let received: Record<string, unknown> | undefined;
  try {
    const offers = [
      { bootId: '00000000-0000-0000-0000-000000000000', socket: path.join(dir, 'nowhere.sock') },
      { bootId: (await import('node:fs')).readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(), socket: path.join(dir, 'nowhere.sock') },
      { bootId: (await import('node:fs')).readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(), socket: '/etc/passwd' },
    ];
    for (const offer of offers) {
      const conn = await keyedConnection(rx.port);
      await conn.send(hello({ capabilities: [CAP_LOCAL, CAP_COMMIT_ACTIVATE], local: { ...offer, token: 'cd'.repeat(16) } }));
      const f = await conn.next(10_000);
      assert.equal(f.type, FrameType.Error, `${offer.socket}: answered with an ERROR`);
      assert.match(decodeError(f.payload).code, /ERR_LIVEMIG_(NOT_LOCAL|CONNECTION|SYSCALL|REFUSED)/);
      conn.close();
      const line = await rx.next();
      assert.ok(line['refused'], `receive printed a refusal and listens on: ${JSON.stringify(line)}`);
    }
    const tx = await sendChild(rx.port, rx.psk);
    assert.equal(tx.status, 0, `a real migration still lands after the bad offers: ${tx.stderr}`);
    for (;;) {
      received = await rx.next();
      if (received['received']) break;
    }
  } finally {
    stopGuest(received);
    rx.child.kill();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a source whose peer never answers its TLS hello says the peer does not speak TLS, well before the handshake timeout', async () => {
  const held: net.Socket[] = [];
  const server = net.createServer((s) => void held.push(s.on('error', () => undefined))); // reads, never writes
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const region = Region.create(64 * 4096, { name: 'silent-tls-peer' });
  let paused = 0;
  try {
    const port = (server.address() as net.AddressInfo).port;
    await assert.rejects(
      migrate({
        region,
        to: { host: '127.0.0.1', port },
        credentials: CLIENT,
        handshakeTimeoutMs: 30_000,
        pause: async () => (paused++, new Uint8Array(4)),
        resume: async () => undefined,
      }),
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_AUTH' && /does not speak TLS/.test(e.message),
    );
    assert.equal(paused, 0, 'the guest was never paused');
  } finally {
    for (const s of held) s.destroy();
    server.close();
    region.release();
  }
});
