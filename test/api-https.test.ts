/**
 * The daemon's API on TCP in HTTPS (issue 31, items 3 and 9): the CLI and the client with the
 * daemon's CA and the token; plain HTTP, another CA, another name and (mutual TLS) a missing or
 * foreign client certificate refused; serve refusing plain HTTP on TCP unless --insecure-api on
 * loopback; the event streams' headers at once on an idle daemon. Through two daemons with
 * certificates, driven over HTTPS: a migration's stages only move forward on both sides, and a
 * cancel is recorded as a cancel by the destination too.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { IncomingMessage } from 'node:http';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { followEvents, request, type ApiTarget, type StreamEvent } from '../src/daemon/client.js';
import { Daemon, type DaemonConfig } from '../src/daemon/daemon.js';
import { LivemigError } from '../src/errors.js';
import type { Credentials } from '../src/security/tls.js';
import type { TestCa } from '../src/security/test-ca.js';
import { probe } from '../src/tracking/probe.js';
import { referenceIncomingCommand } from '../src/workload/controller.js';
import { makeCa, opensslMissing } from './certs.js';
import { call, Pids, registerGuest, settled } from './daemon-helpers.js';
import { until } from './helpers.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.join(here, '../src/cli/main.js');
const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const noGuests = uffd.available ? false : uffd.reason;
const MiB = 1 << 20;
const TOKEN = 'https-test-token-0123456789';
/** the stages in the order docs/API.md gives them (both directions in one list) */
const STAGE_ORDER = ['queued', 'connecting', 'reserve', 'precopy', 'receiving', 'stop-and-copy', 'committed', 'activating', 'activated', 'postcopy', 'done'];

const dirs: string[] = [];
const pids = new Pids();
function tmp(tag: string): string {
  const d = mkdtempSync(path.join(os.tmpdir(), `livemig-https-${tag}-`));
  dirs.push(d);
  return d;
}
afterEach(() => pids.killAll());
after(() => {
  pids.killAll();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

// the daemons' CA (localhost: the source daemon, and the name its API is dialled by; dst-host:
// the destination daemon; client: an API client), and another CA that signed the same names
const ca: TestCa | undefined = opensslMissing ? undefined : makeCa(['localhost', 'dst-host', 'client']);
const otherCa: TestCa | undefined = opensslMissing ? undefined : makeCa(['localhost', 'client']);

/** the PEM files the CLI is given */
function writeFiles(): Record<'ca' | 'otherCa' | 'clientCert' | 'clientKey' | 'otherClientCert' | 'otherClientKey' | 'token', string> {
  const dir = tmp('files');
  const files = {
    ca: path.join(dir, 'ca.crt'),
    otherCa: path.join(dir, 'other-ca.crt'),
    clientCert: path.join(dir, 'client.crt'),
    clientKey: path.join(dir, 'client.key'),
    otherClientCert: path.join(dir, 'other-client.crt'),
    otherClientKey: path.join(dir, 'other-client.key'),
    token: path.join(dir, 'token'),
  };
  writeFileSync(files.ca, ca!.ca);
  writeFileSync(files.otherCa, otherCa!.ca);
  writeFileSync(files.clientCert, ca!.certs['client']!.cert);
  writeFileSync(files.clientKey, ca!.certs['client']!.key, { mode: 0o600 });
  writeFileSync(files.otherClientCert, otherCa!.certs['client']!.cert);
  writeFileSync(files.otherClientKey, otherCa!.certs['client']!.key, { mode: 0o600 });
  writeFileSync(files.token, `${TOKEN}\n`, { mode: 0o600 });
  return files;
}

function credentials(name: 'localhost' | 'dst-host', allow: string[]): Credentials {
  return { kind: 'cert', cert: ca!.certs[name]!.cert, key: ca!.certs[name]!.key, ca: ca!.ca, allow };
}

/** A daemon in this process with its API on 127.0.0.1 (TCP) and the token; its API's port. */
async function start(tag: string, extra: Partial<DaemonConfig>): Promise<{ daemon: Daemon; port: number }> {
  const dir = tmp(tag);
  const daemon = await Daemon.start({
    api: { host: '127.0.0.1', port: 0 },
    token: TOKEN,
    listen: { host: '127.0.0.1', port: 0 },
    guests: path.join(dir, 'guests.sock'),
    guestCommand: referenceIncomingCommand(),
    ...extra,
  });
  return { daemon, port: Number(daemon.apiAddress.split(':').at(-1)) };
}

/** The CLI without blocking this process (whose event loop serves the daemons it calls); no LIVEMIG_* variable but those given. */
async function runAsync(args: string[], extra: Record<string, string> = {}): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env, LIVEMIG_SLICE_US: '0' };
  for (const k of Object.keys(env)) if (k.startsWith('LIVEMIG_API') || k === 'LIVEMIG_TOKEN_FILE') delete env[k];
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...env, ...extra } });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const [status] = (await once(child, 'close')) as [number | null];
  return { status, stdout, stderr };
}

const cannotReach = (e: unknown): boolean => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CONNECTION';

/** The stage events of a migration's replayed history, in order. */
async function stagesOf(api: ApiTarget, id: string): Promise<string[]> {
  const events: StreamEvent[] = [];
  await followEvents(api, `/v1/migrations/${id}/events`, (e) => void events.push(e));
  return events.filter((e) => e.event === 'stage').map((e) => String(e.data['stage']));
}

function assertForwardOnly(stages: string[], what: string): void {
  for (const s of stages) assert.ok(STAGE_ORDER.includes(s), `${what}: '${s}' is a documented stage`);
  for (let i = 1; i < stages.length; i++)
    assert.ok(STAGE_ORDER.indexOf(stages[i]!) > STAGE_ORDER.indexOf(stages[i - 1]!), `${what}: the stages never go back: ${stages.join(' -> ')}`);
}

describe('the API on TCP', { skip: opensslMissing }, () => {
  let files: ReturnType<typeof writeFiles>;
  before(() => {
    files = writeFiles();
  });

  test('HTTPS with the token: the client and the CLI (flags, environment) reach it; plain HTTP, another CA or another name cannot', async () => {
    const { daemon, port } = await start('https', { credentials: credentials('localhost', ['dst-host']) });
    try {
      assert.equal(daemon.apiAddress, `https://127.0.0.1:${port}`);
      const api: ApiTarget = { host: '127.0.0.1', port, tls: { ca: ca!.ca, name: 'localhost' } };
      assert.equal((await call(api, 'GET', '/v1/health')).status, 200);
      assert.equal((await call(api, 'GET', '/v1/guests')).status, 401, 'the token is still asked over HTTPS');
      assert.equal((await call({ ...api, token: TOKEN }, 'GET', '/v1/guests')).status, 200);
      const url = `https://127.0.0.1:${port}`;
      const byFlags = await runAsync(['guests', '--api', url, '--api-ca', files.ca, '--api-name', 'localhost', '--token-file', files.token]);
      assert.equal(byFlags.status, 0, byFlags.stderr);
      assert.equal(byFlags.stdout, 'no guests registered\n');
      // HOST:PORT is HTTPS too, as the daemon serves TCP
      const byEnv = await runAsync(['status'], {
        LIVEMIG_API: `127.0.0.1:${port}`,
        LIVEMIG_API_CA: files.ca,
        LIVEMIG_API_NAME: 'localhost',
        LIVEMIG_TOKEN_FILE: files.token,
      });
      assert.equal(byEnv.status, 0, byEnv.stderr);
      assert.equal(byEnv.stdout, 'no migrations\n');

      // plain HTTP to the HTTPS port: the TLS layer hangs up
      await assert.rejects(request({ host: '127.0.0.1', port, token: TOKEN }, 'GET', '/v1/health'), cannotReach);
      const plain = await runAsync(['status', '--api', `http://127.0.0.1:${port}`, '--token-file', files.token]);
      assert.equal(plain.status, 1, plain.stderr);
      assert.match(plain.stderr, /ERR_LIVEMIG_CONNECTION \(api\): cannot reach the daemon at http:\/\/127\.0\.0\.1:\d+: /);
      // a CA that did not sign the daemon's certificate
      await assert.rejects(request({ ...api, tls: { ca: otherCa!.ca, name: 'localhost' }, token: TOKEN }, 'GET', '/v1/health'), cannotReach);
      const wrongCa = await runAsync(['status', '--api', url, '--api-ca', files.otherCa, '--api-name', 'localhost', '--token-file', files.token]);
      assert.equal(wrongCa.status, 1);
      assert.match(wrongCa.stderr, /ERR_LIVEMIG_CONNECTION \(api\): cannot reach the daemon at https:\/\/127\.0\.0\.1:\d+: .*--api-ca or LIVEMIG_API_CA/);
      // the right CA, but a name the certificate does not carry (the address dialled, or another)
      await assert.rejects(request({ ...api, tls: { ca: ca!.ca }, token: TOKEN }, 'GET', '/v1/health'), cannotReach);
      await assert.rejects(request({ ...api, tls: { ca: ca!.ca, name: 'dst-host' }, token: TOKEN }, 'GET', '/v1/health'), cannotReach);
      // the HTTPS flags on a target that is not HTTPS are refused, not ignored
      const misplaced = await runAsync(['status', '--api', `http://127.0.0.1:${port}`, '--api-ca', files.ca]);
      assert.equal(misplaced.status, 2);
      assert.match(misplaced.stderr, /\(usage\): --api-ca is for an HTTPS API/);
    } finally {
      await daemon.shutdown();
    }
  });

  test('an idle daemon sends the event stream’s status and headers at once', async () => {
    const { daemon, port } = await start('sse', { credentials: credentials('localhost', ['dst-host']) });
    try {
      const res = await new Promise<IncomingMessage>((resolve, reject) => {
        const req = https.get(
          {
            host: '127.0.0.1',
            port,
            path: '/v1/events',
            ca: ca!.ca,
            servername: 'localhost',
            headers: { accept: 'text/event-stream', authorization: `Bearer ${TOKEN}` },
          },
          resolve,
        );
        req.on('error', reject);
        // generous: the stream's first event could be minutes away; its headers are not
        setTimeout(() => reject(new Error('no response headers within 60 s from an idle daemon')), 60_000).unref();
      });
      try {
        assert.equal(res.statusCode, 200);
        assert.match(String(res.headers['content-type']), /^text\/event-stream/);
        const [first] = (await once(res, 'data')) as [Buffer];
        assert.match(first.toString('utf8'), /^: /, 'a keep-alive comment, not an event');
        assert.equal(daemon.table.list().length, 0, 'no migration was running');
      } finally {
        res.destroy();
      }
    } finally {
      await daemon.shutdown();
    }
  });

  test('--api-mtls: a client without a certificate, or with one another CA signed, is refused; the CLI sends its own', async () => {
    const { daemon, port } = await start('mtls', { credentials: credentials('localhost', ['dst-host']), apiClientCerts: true });
    try {
      const base = { host: '127.0.0.1', port, token: TOKEN };
      const server = { ca: ca!.ca, name: 'localhost' };
      await assert.rejects(request({ ...base, tls: server }, 'GET', '/v1/health'), cannotReach, 'no client certificate');
      const foreign = { ...server, cert: otherCa!.certs['client']!.cert, key: otherCa!.certs['client']!.key };
      await assert.rejects(request({ ...base, tls: foreign }, 'GET', '/v1/health'), cannotReach, 'a client certificate another CA signed');
      const own = { ...server, cert: ca!.certs['client']!.cert, key: ca!.certs['client']!.key };
      assert.equal((await call({ ...base, tls: own }, 'GET', '/v1/guests')).status, 200);
      assert.equal((await call({ host: '127.0.0.1', port, tls: own }, 'GET', '/v1/guests')).status, 401, 'a certificate does not replace the token');

      const reach = ['--api', `https://127.0.0.1:${port}`, '--api-ca', files.ca, '--api-name', 'localhost', '--token-file', files.token];
      const withCert = await runAsync(['guests', ...reach, '--api-cert', files.clientCert, '--api-key', files.clientKey]);
      assert.equal(withCert.status, 0, withCert.stderr);
      const fromEnv = await runAsync(['status', ...reach], { LIVEMIG_API_CERT: files.clientCert, LIVEMIG_API_KEY: files.clientKey });
      assert.equal(fromEnv.status, 0, fromEnv.stderr);
      const without = await runAsync(['guests', ...reach]);
      assert.equal(without.status, 1);
      assert.match(without.stderr, /ERR_LIVEMIG_CONNECTION \(api\): .*--api-mtls wants --api-cert\/--api-key/);
      const otherCert = await runAsync(['guests', ...reach, '--api-cert', files.otherClientCert, '--api-key', files.otherClientKey]);
      assert.equal(otherCert.status, 1);
      const certAlone = await runAsync(['guests', ...reach, '--api-cert', files.clientCert]);
      assert.equal(certAlone.status, 2);
      assert.match(certAlone.stderr, /needs both --api-cert and --api-key/);
    } finally {
      await daemon.shutdown();
    }
  });

  test('serve refuses plain HTTP on TCP, naming the fix; --insecure-api is refused off loopback and serves plain HTTP on it', async () => {
    const dir = tmp('refuse');
    const serve = (...args: string[]) =>
      runAsync(['serve', '--guests', path.join(dir, 'guests.sock'), '--listen', '127.0.0.1:0', '--token-file', files.token, ...args]);
    const noCertificate = await serve('--api', '127.0.0.1:0');
    assert.equal(noCertificate.status, 2);
    assert.match(noCertificate.stderr, /ERR_LIVEMIG_INSECURE \(validate\): the API on TCP \(127\.0\.0\.1:0\) is served over HTTPS with the daemon's/);
    assert.match(noCertificate.stderr, /and this daemon has none: give --tls-cert\/--tls-key\/--tls-ca, or serve the API on a unix socket .*--insecure-api/);
    const httpUrl = await serve('--api', 'http://127.0.0.1:0');
    assert.equal(httpUrl.status, 2);
    assert.match(httpUrl.stderr, /ERR_LIVEMIG_INSECURE \(validate\): --api: http:\/\/127\.0\.0\.1:0 is plain HTTP on TCP: /);
    assert.match(httpUrl.stderr, /plain HTTP needs --insecure-api, on a loopback address only/);
    const offLoopback = await serve('--api', '0.0.0.0:0', '--insecure-api');
    assert.equal(offLoopback.status, 2);
    assert.match(offLoopback.stderr, /ERR_LIVEMIG_INSECURE \(validate\): --insecure-api serves the API in plain HTTP, which only a loopback address may carry/);
    assert.match(offLoopback.stderr, /may carry, not 0\.0\.0\.0:0/);
    const both = await serve('--api', 'https://127.0.0.1:0', '--insecure-api');
    assert.equal(both.status, 2);
    assert.match(both.stderr, /asks for HTTPS and --insecure-api for plain HTTP: give one/);
    // a daemon that authenticates migrations with a pre-shared key has no certificate to serve
    await assert.rejects(
      start('psk', { credentials: { kind: 'psk', identity: 'x', key: Buffer.alloc(32, 7) } }),
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_INSECURE' && /--psk-file authenticates migrations without one/.test(e.message),
    );

    const { daemon, port } = await start('insecure', { insecureApi: true });
    try {
      assert.equal(daemon.apiAddress, `http://127.0.0.1:${port}`);
      const plain: ApiTarget = { host: '127.0.0.1', port };
      assert.equal((await call(plain, 'GET', '/v1/health')).status, 200);
      assert.equal((await call(plain, 'GET', '/v1/guests')).status, 401, 'the token is still asked');
      const cli = await runAsync(['status', '--api', daemon.apiAddress, '--token-file', files.token]);
      assert.equal(cli.status, 0, cli.stderr);
      assert.equal(cli.stdout, 'no migrations\n');
    } finally {
      await daemon.shutdown();
    }
  });
});

describe('two daemons with certificates, driven over HTTPS', { skip: opensslMissing || noGuests }, () => {
  let files: ReturnType<typeof writeFiles>;
  let a: { daemon: Daemon; port: number };
  let b: { daemon: Daemon; port: number };
  let A: ApiTarget;
  let B: ApiTarget;
  let cliEnv: Record<string, string>;
  before(async () => {
    files = writeFiles();
    a = await start('src', { credentials: credentials('localhost', ['dst-host']) });
    b = await start('dst', { credentials: credentials('dst-host', ['localhost']) });
    A = { host: '127.0.0.1', port: a.port, tls: { ca: ca!.ca, name: 'localhost' }, token: TOKEN };
    B = { host: '127.0.0.1', port: b.port, tls: { ca: ca!.ca, name: 'dst-host' }, token: TOKEN };
    cliEnv = { LIVEMIG_API: a.daemon.apiAddress, LIVEMIG_API_CA: files.ca, LIVEMIG_API_NAME: 'localhost', LIVEMIG_TOKEN_FILE: files.token };
  });
  after(async () => {
    for (const d of [a.daemon, b.daemon])
      for (const m of d.table.list()) {
        const pid = Number(d.extra(m)['guest_pid'] ?? 0);
        if (pid > 0) pids.push(pid);
      }
    pids.killAll();
    await a.daemon.shutdown();
    await b.daemon.shutdown();
  });

  const incomingIds = (): Set<string> => new Set(b.daemon.table.list().map((m) => m.id));

  test('migrate --follow through the CLI over HTTPS; the stages of both sides only move forward', async () => {
    const g = await registerGuest(A, a.daemon.registry.path, 'https-guest', { size: 32 * MiB });
    pids.push(g.pid);
    const earlier = incomingIds();
    const m = await runAsync(
      ['migrate', 'https-guest', '--to', `127.0.0.1:${b.daemon.migrationPort}`, '--peer-name', 'dst-host', '--follow', '--json'],
      cliEnv,
    );
    assert.equal(m.status, 0, m.stderr);
    const lines = m.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    assert.equal(lines.at(-1)!['state'], 'completed');
    const id = String(lines[0]!['id']);
    const outgoing = await stagesOf(A, id);
    assertForwardOnly(outgoing, 'the source');
    assert.deepEqual([outgoing[0], outgoing.at(-1)], ['connecting', 'done']);
    for (const s of ['precopy', 'activating', 'activated']) assert.ok(outgoing.includes(s), `the source passed ${s}: ${outgoing.join(' -> ')}`);
    const there = b.daemon.table.list().find((x) => !earlier.has(x.id))!;
    assert.equal(there.state, 'completed');
    const incoming = await stagesOf(B, there.id);
    assertForwardOnly(incoming, 'the destination');
    assert.deepEqual(incoming, ['reserve', 'receiving', 'committed', 'done']);
  });

  test('a cancel from the source is recorded as a cancel by the destination too', async () => {
    const g = await registerGuest(A, a.daemon.registry.path, 'cancel-guest', { size: 64 * MiB });
    pids.push(g.pid);
    const earlier = incomingIds();
    const created = await call(A, 'POST', '/v1/migrations', {
      guest: 'cancel-guest',
      to: { host: '127.0.0.1', port: b.daemon.migrationPort, peer_name: 'dst-host' },
      bandwidth_mib_s: 8, // its first round takes seconds: the cancel comes inside it
    });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const id = String(created.body['id']);
    // past the handshake on both sides (a loaded host takes its time: waited for, not timed)
    await until('the source is in pre-copy', async () => (await call(A, 'GET', `/v1/migrations/${id}`)).body['stage'] === 'precopy', 120_000);
    await until('the destination is receiving', () => b.daemon.table.list().some((x) => !earlier.has(x.id) && x.stage === 'receiving'), 120_000);
    const cancel = await runAsync(['cancel', id], cliEnv);
    assert.equal(cancel.status, 0, cancel.stderr);
    const source = await settled(A, id);
    assert.deepEqual([source['state'], (source['error'] as { code: string }).code, source['source_guest']], ['cancelled', 'ERR_LIVEMIG_CANCELLED', 'running']);
    const there = b.daemon.table.list().find((x) => !earlier.has(x.id))!;
    await until('the destination ended it', () => there.done, 120_000);
    const view = (await call(B, 'GET', `/v1/migrations/${there.id}`)).body;
    assert.equal(view['state'], 'cancelled', JSON.stringify(view['error']));
    const error = view['error'] as { code: string; message: string };
    assert.equal(error.code, 'ERR_LIVEMIG_CANCELLED');
    assert.match(error.message, /^cancelled by the source: /);
    assert.equal(b.daemon.budget.reserved, 0, 'the destination gave its reservation back');
  });
});
