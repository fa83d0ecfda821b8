/**
 * What an operator met driving `livemig serve` on two hosts with the CLI (issue 31, item 9):
 * guests and postcopy as commands, --api and --token-file from the environment, --api as a URL,
 * a closed stdout, help --help, usage errors and keys ca's directory, secrets others can read,
 * keys token, send --guest to nothing, schema errors that name the field, and every status the
 * API answers in docs/API.md.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { once } from 'node:events';
import { chmodSync, closeSync, constants, existsSync, openSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net, { type AddressInfo } from 'node:net';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Daemon } from '../src/daemon/daemon.js';
import { HTTP_STATUS } from '../src/daemon/api/errors.js';
import { request, type ApiTarget } from '../src/daemon/client.js';
import { DaemonProcess } from '../src/daemon/process.js';
import { probe } from '../src/tracking/probe.js';
import { referenceIncomingCommand } from '../src/workload/controller.js';
import { opensslMissing, makeCa } from './certs.js';
import { call, registerGuest, scratch, settled } from './daemon-helpers.js';
import { until } from './helpers.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const CLI = path.join(here, '../src/cli/main.js');
const API_DOC = path.join(here, '../../docs/API.md');
const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const noGuests = uffd.available ? false : uffd.reason;
const MiB = 1 << 20;
/** a bound for a CLI call that must end by itself: generous, so that a loaded host changes how long it takes, not the verdict */
const CALL_BOUND_MS = 300_000;

const { tmp, pids } = scratch('livemig-op');

/** this process's environment without the variables under test: each test sets its own */
function env(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const e: NodeJS.ProcessEnv = { ...process.env, LIVEMIG_SLICE_US: '0', ...extra };
  for (const k of ['LIVEMIG_API', 'LIVEMIG_TOKEN_FILE', 'LIVEMIG_API_CA', 'LIVEMIG_API_NAME', 'LIVEMIG_API_CERT', 'LIVEMIG_API_KEY'])
    if (!(k in extra)) delete e[k];
  return e;
}

const run = (args: string[], extra: Record<string, string> = {}): SpawnSyncReturns<string> =>
  spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: CALL_BOUND_MS, env: env(extra) });

/** The CLI without blocking this process (whose event loop serves what the CLI calls). */
async function runAsync(args: string[], extra: Record<string, string> = {}): Promise<{ status: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: env(extra) });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const [status] = (await once(child, 'close')) as [number | null];
  return { status, stdout, stderr };
}

/**
 * The CLI with a stdout nobody reads any more: a FIFO whose only reader closed before the CLI
 * started, so its first write fails with EPIPE whatever the timing (`| head -0`, made certain).
 */
async function withClosedStdout(args: string[]): Promise<{ status: number | null; signal: NodeJS.Signals | null; stderr: string }> {
  const fifo = path.join(tmp('fifo'), 'out');
  const made = spawnSync('mkfifo', [fifo]);
  assert.equal(made.status, 0, `mkfifo: ${String(made.stderr)}`);
  const reader = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  closeSync(reader);
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', writer, 'pipe'], env: env() });
  closeSync(writer);
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const [status, signal] = (await once(child, 'close')) as [number | null, NodeJS.Signals | null];
  return { status, signal, stderr };
}

function lastJson(stdout: string): Record<string, unknown> {
  return JSON.parse(stdout.trim().split('\n').at(-1) ?? '{}') as Record<string, unknown>;
}

test('help --help, help -h and help help print the global usage and exit 0', () => {
  for (const args of [
    ['help', '--help'],
    ['help', '-h'],
    ['help', 'help'],
    ['--help', 'help'],
  ]) {
    const r = run(args);
    assert.equal(r.status, 0, `livemig ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stdout, /^usage: livemig <command>/, `livemig ${args.join(' ')}`);
    assert.match(r.stdout, /\n {2}guests +/, 'the global usage lists the new commands');
    assert.match(r.stdout, /\n {2}postcopy +/);
  }
  const keys = run(['keys', '--help']);
  assert.match(keys.stdout, /^usage: livemig keys .*\| token --out FILE \|/);
  assert.match(keys.stdout, /\n {2}--out FILE\|DIR +psk, token: the file to write; ca: the directory to write into, made \(0700\) when missing/);
  for (const cmd of ['guests', 'postcopy']) {
    const r = run([cmd, '--help']);
    assert.equal(r.status, 0);
    assert.match(r.stdout, new RegExp(`^usage: livemig ${cmd} `));
    for (const flag of [
      '--api',
      '--token-file',
      '--api-ca',
      '--api-name',
      '--api-cert',
      '--api-key',
      '--json',
      'LIVEMIG_API',
      'LIVEMIG_TOKEN_FILE',
      'LIVEMIG_API_CA',
    ])
      assert.ok(r.stdout.includes(flag), `${cmd} --help names ${flag}`);
  }
});

test('a usage error prints the error, a newline, then the command usage; exit 2', () => {
  const cases: [string[], RegExp][] = [
    [['keys'], /^livemig: ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): keys needs what to make: one of psk, token, ca\nusage: livemig keys psk --out FILE/],
    [['keys', 'token'], /^livemig: ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): keys token needs --out FILE\nusage: livemig keys /],
    [['status', '--bogus'], /^livemig: ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): status: Unknown option '--bogus'.*\nusage: livemig status \[ID\]/],
    [['postcopy'], /^livemig: ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): postcopy needs one migration ID\nusage: livemig postcopy ID/],
    [['guests', 'a', 'b'], /\(usage\): guests takes at most one guest NAME\nusage: livemig guests \[NAME\]/],
  ];
  for (const [args, expected] of cases) {
    const r = run(args);
    assert.equal(r.status, 2, `livemig ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, expected, `livemig ${args.join(' ')}`);
    assert.match(r.stderr, /\(every flag: livemig [a-z]+ --help\)\n$/, 'the usage ends the output, on lines of its own');
  }
});

test('keys ca --out DIR makes DIR, mode 0700, when it does not exist', { skip: opensslMissing }, () => {
  const dir = path.join(tmp('ca'), 'new', 'ca');
  const r = run(['keys', 'ca', '--out', dir, '--names', 'src,dst', '--days', '1']);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(statSync(dir).mode & 0o777, 0o700);
  for (const f of ['ca.crt', 'ca.key', 'src.crt', 'src.key', 'dst.crt', 'dst.key']) assert.ok(existsSync(path.join(dir, f)), f);
  const refused = path.join(tmp('ca-refused'), 'never');
  assert.equal(run(['keys', 'ca', '--out', refused, '--names', 'a/CN=b']).status, 2);
  assert.equal(existsSync(refused), false, 'names refused before openssl leave no directory behind');
});

test('a PSK file or token file its group or others can read is refused, with the chmod to apply', () => {
  const dir = tmp('modes');
  const psk = path.join(dir, 'shared.psk');
  writeFileSync(psk, `src:${'ab'.repeat(32)}\n`, { mode: 0o600 });
  chmodSync(psk, 0o644);
  const token = path.join(dir, 'token');
  writeFileSync(token, `${'cd'.repeat(32)}\n`, { mode: 0o600 });
  chmodSync(token, 0o640);
  const cases: [string[], Record<string, string>, RegExp][] = [
    [['receive', '--listen', '127.0.0.1:0', '--psk-file', psk], {}, /--psk-file: \S+ has mode 0644: its group or others can read .*chmod 600 \S+shared\.psk/],
    [['send', '--to', '127.0.0.1:1', '--psk-file', psk, '--size', '16MiB'], {}, /--psk-file: .*chmod 600 /],
    [['status', '--token-file', token], {}, /--token-file: \S+ has mode 0640: .*chmod 600 \S+token/],
    [['status'], { LIVEMIG_TOKEN_FILE: token }, /LIVEMIG_TOKEN_FILE: \S+ has mode 0640: .*chmod 600 /],
    [['serve', '--api', path.join(dir, 'api.sock'), '--guests', path.join(dir, 'g.sock'), '--listen', '127.0.0.1:0', '--token-file', token], {}, /chmod 600 /],
  ];
  for (const [args, extra, expected] of cases) {
    const r = run(args, extra);
    assert.equal(r.status, 2, `livemig ${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /ERR_LIVEMIG_INVALID_ARGUMENT/);
    assert.match(r.stderr, expected, `livemig ${args.join(' ')}`);
    assert.equal(r.stdout, '', 'nothing started: no guest, no listener');
  }
  chmodSync(psk, 0o620);
  assert.match(run(['receive', '--psk-file', psk]).stderr, /mode 0620: its group or others can change/, 'writable by the group is refused too');
});

test('send --guest to a socket that does not exist (or to no socket, or to a dead one) fails at once and reports no source guest', async () => {
  const dir = tmp('send-guest');
  const notASocket = path.join(dir, 'plain-file');
  writeFileSync(notASocket, 'x');
  // a socket whose guest is gone: its listener killed before it could remove the file
  const dead = path.join(dir, 'dead.sock');
  const maker = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(dead)}, () => process.kill(process.pid, 'SIGKILL'))`]);
  await once(maker, 'exit');
  assert.ok(statSync(dead).isSocket(), 'the dead guest left its socket');
  const cases: [string, RegExp][] = [
    [path.join(dir, 'none.sock'), /the socket does not exist/],
    [notASocket, /it is not a socket/],
    [dead, /nothing listens there \(ECONNREFUSED\)/],
  ];
  for (const [socket, why] of cases) {
    const r = run(['send', '--to', '127.0.0.1:1', '--guest', socket, '--json']);
    assert.equal(r.status, 1, r.stderr);
    const out = lastJson(r.stdout) as { error: { code: string; message: string }; source_guest: string; guest_pid?: number };
    assert.equal(out.error.code, 'ERR_LIVEMIG_GUEST', JSON.stringify(out));
    assert.match(out.error.message, why);
    assert.ok(out.error.message.includes(socket), 'the message names the socket');
    assert.equal(out.source_guest, 'none', 'no source guest: none was there');
    assert.equal(out.guest_pid, undefined);
  }
});

test('--api takes a socket path, HOST:PORT, http:// and https:// URLs; anything else is refused naming the value', () => {
  const refused = ['ftp://10.77.0.1:8080', 'http://10.77.0.1', 'http://10.77.0.1:8080/v1', 'http://user@10.77.0.1:8080', '10.77.0.1', 'host:port', 'a b:1'];
  for (const value of refused) {
    const r = run(['status', '--api', value]);
    assert.equal(r.status, 2, `--api ${value}: ${r.stderr}`);
    assert.ok(r.stderr.startsWith(`livemig: ERR_LIVEMIG_INVALID_ARGUMENT (usage): --api: '${value}' is not a daemon address`), r.stderr);
  }
  const fromEnv = run(['guests'], { LIVEMIG_API: 'ftp://10.77.0.1:8080' });
  assert.equal(fromEnv.status, 2);
  assert.match(fromEnv.stderr, /LIVEMIG_API: 'ftp:\/\/10\.77\.0\.1:8080' is not a daemon address/);
  // the operator's URL: reached as host and port (nothing listens on port 1), not looked up as a name
  const url = run(['status', '--api', 'http://127.0.0.1:1']);
  assert.equal(url.status, 1);
  assert.match(url.stderr, /ERR_LIVEMIG_CONNECTION \(api\): cannot reach the daemon at http:\/\/127\.0\.0\.1:1: .*ECONNREFUSED/);
  assert.doesNotMatch(url.stderr, /ENOTFOUND/);
  const bare = path.join(tmp('bare'), 'api.sock');
  const socketPath = run(['status', '--api', bare]);
  assert.equal(socketPath.status, 1);
  assert.ok(socketPath.stderr.includes(`cannot reach the daemon at unix:${bare}`), socketPath.stderr);
  const ipv6 = run(['status', '--api', 'http://[::1]:1']);
  assert.equal(ipv6.status, 1, 'an IPv6 URL is an address too');
  assert.match(ipv6.stderr, /cannot reach the daemon at http:\/\/\[::1\]:1/);
  const serveBoth = run(['serve', '--api', 'https://127.0.0.1:0', '--insecure-api']);
  assert.equal(serveBoth.status, 2);
  assert.match(serveBoth.stderr, /--api: https:\/\/127\.0\.0\.1:0 asks for HTTPS and --insecure-api for plain HTTP: give one/);
});

test('--api https://HOST:PORT speaks TLS (a proxy in front of the daemon), its certificate checked', { skip: opensslMissing }, async () => {
  const dir = tmp('https');
  const ca = makeCa(['localhost']);
  const caFile = path.join(dir, 'ca.crt');
  writeFileSync(caFile, ca.ca);
  const tokenFile = path.join(dir, 'token');
  const token = 'e'.repeat(40);
  writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
  const seen: string[] = [];
  const server = https.createServer({ key: ca.certs['localhost']!.key, cert: ca.certs['localhost']!.cert }, (req, res) => {
    seen.push(`${req.method} ${req.url} ${req.headers.authorization ?? '-'}`);
    res.setHeader('content-type', 'application/json');
    res.end(
      JSON.stringify({
        guests: [{ name: 'behind-tls', pid: 4242, state: 'idle', bytes: 16 * MiB, tracking: 'uffd-wp-async', regions: [{ id: 0 }], registered_at: 'now' }],
      }),
    );
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as AddressInfo;
  try {
    const api = `https://localhost:${port}`;
    // localhost may resolve to ::1 first: the client tries both families, the server is on 127.0.0.1
    const r = await runAsync(['guests', '--json'], { LIVEMIG_API: api, LIVEMIG_TOKEN_FILE: tokenFile, NODE_EXTRA_CA_CERTS: caFile });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(
      r.stdout
        .trim()
        .split('\n')
        .map((l) => (JSON.parse(l) as { name: string }).name),
      ['behind-tls'],
    );
    assert.deepEqual(seen, [`GET /v1/guests Bearer ${token}`]);
    const untrusted = await runAsync(['guests', '--api', api]);
    assert.equal(untrusted.status, 1, 'a certificate from a CA the client does not trust is refused');
    assert.match(untrusted.stderr, /ERR_LIVEMIG_CONNECTION \(api\): cannot reach the daemon at https:\/\/localhost:\d+: /);
    assert.equal(seen.length, 1, 'nothing was asked of the server it did not trust');
  } finally {
    server.close();
  }
});

test('a closed stdout ends a command quietly, exit 0, no stack trace; serve shuts down in order, guest stops its guest', async () => {
  const dir = tmp('closed');
  const serve = ['serve', '--api', `unix:${path.join(dir, 'api.sock')}`, '--guests', path.join(dir, 'guests.sock'), '--listen', '127.0.0.1:0'];
  const guest = ['guest', '--socket', path.join(dir, 'guest.sock'), '--size', '16MiB', '--rate', '0'];
  for (const args of [['help'], ['keys', '--help'], ['probe'], ['probe', '--json'], serve, guest]) {
    const r = await withClosedStdout(args);
    assert.deepEqual([r.status, r.signal], [0, null], `livemig ${args.join(' ')}: ${r.stderr}`);
    assert.equal(r.stderr, '', `livemig ${args.join(' ')} says nothing on stderr`);
  }
  assert.equal(existsSync(path.join(dir, 'api.sock')), false, 'serve shut down in order: it removed its API socket (an abrupt exit leaves it)');
});

test('serve under systemd (JOURNAL_STREAM set) outlives its stdout: a journald restart costs lines, not the daemon', async () => {
  const dir = tmp('journal');
  const api = path.join(dir, 'api.sock');
  const fifo = path.join(dir, 'out');
  assert.equal(spawnSync('mkfifo', [fifo]).status, 0);
  const reader = openSync(fifo, constants.O_RDONLY | constants.O_NONBLOCK);
  const writer = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  const args = ['serve', '--api', `unix:${api}`, '--guests', path.join(dir, 'guests.sock'), '--listen', '127.0.0.1:0'];
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', writer, 'pipe'], env: env({ JOURNAL_STREAM: '8:12345' }) });
  closeSync(writer);
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (x: string) => (stderr += x));
  try {
    await until('serve listens', () => existsSync(api), CALL_BOUND_MS);
    closeSync(reader); // the journal goes away
    const port = Number((await request({ socketPath: api }, 'GET', '/v1/health')).body['migration_port']);
    // a refusal prints a line: written after the close, it fails again, and the daemon goes on
    const scan = net.connect(port, '127.0.0.1', () => scan.end(Buffer.from('not a livemig hello')));
    await once(scan, 'close');
    await until('the refusal is recorded', async () =>
      (await request<{ migrations: { state: string }[] }>({ socketPath: api }, 'GET', '/v1/migrations')).body.migrations.some((m) => m.state === 'refused'),
    );
    assert.equal((await request({ socketPath: api }, 'GET', '/v1/health')).body['ok'], true, 'it still serves');
    assert.equal(child.exitCode, null);
  } finally {
    child.kill('SIGTERM');
  }
  const [status] = (await once(child, 'close')) as [number | null];
  assert.equal(status, 0);
  assert.equal(stderr, '', 'nothing on stderr either');
});

test('keys token writes a token serve and the clients take; --api and --token-file from LIVEMIG_API and LIVEMIG_TOKEN_FILE, the flags winning', async () => {
  const dir = tmp('token');
  const tokenFile = path.join(dir, 'api.token');
  const made = run(['keys', 'token', '--out', tokenFile]);
  assert.equal(made.status, 0, made.stderr);
  assert.deepEqual(JSON.parse(made.stdout), { written: tokenFile, token_bytes: 32 });
  assert.equal(statSync(tokenFile).mode & 0o777, 0o600, 'the token file is its owner only');
  assert.match(readFileSync(tokenFile, 'utf8'), /^[0-9a-f]{64}\n$/);
  assert.equal(run(['keys', 'token', '--out', tokenFile]).status, 2, 'an existing file is never overwritten');
  const other = path.join(dir, 'other.token');
  assert.equal(run(['keys', 'token', '--out', other]).status, 0);
  assert.notEqual(readFileSync(other, 'utf8'), readFileSync(tokenFile, 'utf8'), 'each token is new');

  const serve = spawn(
    process.execPath,
    // plain HTTP on loopback, on purpose (test/api-https.test.ts drives the API over HTTPS)
    [CLI, 'serve', '--api', 'http://127.0.0.1:0', '--insecure-api', '--guests', path.join(dir, 'guests.sock'), '--listen', '127.0.0.1:0'],
    // the token file from the environment, as the clients take it
    { stdio: ['ignore', 'pipe', 'inherit'], env: env({ LIVEMIG_TOKEN_FILE: tokenFile }) },
  );
  try {
    const first = await Promise.race([
      once(createInterface({ input: serve.stdout }), 'line') as Promise<[string]>,
      once(serve, 'exit').then(([code]) => Promise.reject(new Error(`livemig serve exited (${String(code)}) before serving`))),
    ]);
    const { serving } = JSON.parse(first[0]) as { serving: { api: string } };
    assert.match(serving.api, /^http:\/\/127\.0\.0\.1:\d+$/);
    const url = serving.api;
    const flags = await runAsync(['guests', '--api', url, '--token-file', tokenFile]);
    assert.equal(flags.status, 0, flags.stderr);
    assert.equal(flags.stdout, 'no guests registered\n');
    const fromEnv = await runAsync(['status'], { LIVEMIG_API: url, LIVEMIG_TOKEN_FILE: tokenFile });
    assert.equal(fromEnv.status, 0, fromEnv.stderr);
    assert.equal(fromEnv.stdout, 'no migrations\n');
    const flagWins = await runAsync(['status', '--api', url], { LIVEMIG_API: `unix:${path.join(dir, 'nobody.sock')}`, LIVEMIG_TOKEN_FILE: tokenFile });
    assert.equal(flagWins.status, 0, `--api wins over LIVEMIG_API: ${flagWins.stderr}`);
    const nowhere = path.join(dir, 'nobody.sock');
    const flagWinsAgain = await runAsync(['status', '--api', `unix:${nowhere}`], { LIVEMIG_API: url, LIVEMIG_TOKEN_FILE: tokenFile });
    assert.equal(flagWinsAgain.status, 1);
    assert.ok(flagWinsAgain.stderr.includes(`cannot reach the daemon at unix:${nowhere}`), flagWinsAgain.stderr);
    const wrongToken = await runAsync(['status', '--token-file', other], { LIVEMIG_API: url, LIVEMIG_TOKEN_FILE: tokenFile });
    assert.equal(wrongToken.status, 1, '--token-file wins over LIVEMIG_TOKEN_FILE');
    assert.match(wrongToken.stderr, /ERR_LIVEMIG_UNAUTHORIZED/);
    const none = await runAsync(['status'], { LIVEMIG_API: url });
    assert.equal(none.status, 1);
    assert.match(none.stderr, /ERR_LIVEMIG_UNAUTHORIZED/);
  } finally {
    serve.kill('SIGTERM');
    await once(serve, 'close');
  }
});

describe('the API says which field is wrong, and answers every refusal in its documented shape', () => {
  let daemon: Daemon;
  let api: ApiTarget & { socketPath: string };
  const raw = (method: string, route: string, headers: Record<string, string>, body?: string): Promise<{ status: number; body: Record<string, unknown> }> =>
    new Promise((resolve, reject) => {
      const req = http.request({ socketPath: api.socketPath, method, path: route, headers }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}') as Record<string, unknown> }),
        );
      });
      req.on('error', reject);
      req.end(body);
    });

  before(async () => {
    const dir = tmp('api');
    daemon = await Daemon.start({
      api: { path: path.join(dir, 'api.sock') },
      listen: { host: '127.0.0.1', port: 0 },
      guests: path.join(dir, 'guests.sock'),
      guestCommand: referenceIncomingCommand(),
    });
    api = { socketPath: path.join(dir, 'api.sock') };
  });

  test('a schema error names the field, what is wrong with it and what is allowed', async () => {
    const to = { host: '127.0.0.1', port: daemon.migrationPort };
    const cases: [string, string, unknown, string, RegExp][] = [
      ['POST', '/v1/migrations', { guest: 'g', to, surprise: 1 }, 'surprise', /body: unknown field 'surprise' \(allowed in the body: guest, to, mode, /],
      ['POST', '/v1/migrations', { guest: 'g', to: { ...to, prot: 1 } }, 'to.prot', /body: unknown field 'to\.prot' \(allowed in to: host, port, peer_name\)/],
      ['POST', '/v1/migrations', { to }, 'guest', /body: field 'guest' is required/],
      ['POST', '/v1/migrations', { guest: 'g', to, mode: 'teleport' }, 'mode', /body: 'mode' must be one of precopy, postcopy, hybrid, got "teleport"/],
      ['POST', '/v1/migrations', { guest: 'g', to: { ...to, port: '7878' } }, 'to.port', /body: 'to\.port' must be integer, got "7878"/],
      [
        'PATCH',
        '/v1/migrations/00000000-0000-0000-0000-000000000000',
        {},
        '',
        /body: needs at least one of bandwidth_mib_s, postcopy_bandwidth_mib_s, downtime_limit_ms/,
      ],
      [
        'GET',
        '/v1/migrations?state=sleeping',
        undefined,
        'state',
        /querystring: 'state' must be one of queued, running, completed, failed, cancelled, refused, got "sleeping"/,
      ],
      ['GET', '/v1/migrations?colour=red', undefined, 'colour', /querystring: unknown field 'colour' \(allowed in the querystring: state, direction, since\)/],
      ['GET', '/v1/migrations/not-an-id', undefined, 'id', /params: 'id' must match pattern .*, got "not-an-id"/],
    ];
    for (const [method, route, body, field, message] of cases) {
      const r = await call(api, method, route, body);
      const error = r.body['error'] as { code: string; message: string; phase: string; field?: string };
      const what = `${method} ${route} ${JSON.stringify(body)}: ${JSON.stringify(r.body)}`;
      assert.deepEqual([r.status, error.code, error.phase], [400, 'ERR_LIVEMIG_INVALID_ARGUMENT', 'validate'], what);
      assert.equal(error.field, field || undefined, what);
      assert.match(error.message, message, what);
    }
    assert.equal(daemon.table.list().length, 0, 'no migration was created');
  });

  test('406, 413, 415, a body that is not JSON and a method no route takes: each in the error shape, each status in docs/API.md', async () => {
    const json = { 'content-type': 'application/json' };
    const cases: [number, Promise<{ status: number; body: Record<string, unknown> }>, RegExp][] = [
      [406, raw('GET', '/v1/events', { accept: 'application/json' }), /only Server-Sent Events: ask with 'Accept: text\/event-stream'/],
      [413, raw('POST', '/v1/migrations', json, JSON.stringify({ guest: 'x'.repeat(70 * 1024) })), /larger than 64 KiB/],
      [415, raw('POST', '/v1/migrations', { 'content-type': 'text/plain' }, 'guest=g'), /must be JSON .*got 'text\/plain'/],
      [400, raw('POST', '/v1/migrations', json, '{"guest":'), /not valid JSON/],
      [404, raw('DELETE', '/v1/guests', {}), /no route DELETE \/v1\/guests/],
    ];
    const table = documentedStatuses();
    for (const [status, answer, message] of cases) {
      const r = await answer;
      const error = (r.body['error'] ?? {}) as { code?: string; message?: string };
      assert.equal(r.status, status, JSON.stringify(r.body));
      assert.equal(error.code, status === 404 ? 'ERR_LIVEMIG_NOT_FOUND' : 'ERR_LIVEMIG_INVALID_ARGUMENT', JSON.stringify(r.body));
      assert.match(String(error.message), message);
      assert.ok(table.get(status)?.includes(`\`${error.code}\``), `docs/API.md lists ${error.code} under ${status}`);
    }
  });

  after(async () => {
    await daemon.shutdown();
  });
});

/** docs/API.md's status table: status -> the text of its row */
function documentedStatuses(): Map<number, string> {
  const doc = readFileSync(API_DOC, 'utf8');
  const section = doc.slice(doc.indexOf('### Statuses and errors'));
  const rows = new Map<number, string>();
  for (const m of section.matchAll(/^\| (\d{3}) \| (.*) \|$/gm)) rows.set(Number(m[1]), m[2]!);
  return rows;
}

test("docs/API.md's status table has every status of the API's error table, each with its codes, and fastify's own", () => {
  const rows = documentedStatuses();
  for (const [code, status] of Object.entries(HTTP_STATUS)) {
    assert.ok(rows.get(status!)?.includes(`\`${code}\``), `docs/API.md lists ${code} under ${status}`);
  }
  for (const status of [406, 413, 415, 500]) assert.ok(rows.has(status), `docs/API.md lists ${status}`);
});

test(
  'the CLI lists guests (text, --json, one by name), switches a migration to post-copy, and a closed stdout ends status quietly',
  { skip: noGuests },
  async () => {
    const a = await DaemonProcess.start({ dir: tmp('cli-a') });
    const b = await DaemonProcess.start({ dir: tmp('cli-b') });
    const A: ApiTarget = { socketPath: a.socketPath };
    try {
      const g = await registerGuest(A, a.guests, 'op-guest', { size: 32 * MiB, rate: 8 });
      pids.push(g.pid);
      const cli = (...args: string[]): SpawnSyncReturns<string> => run([...args, '--api', a.api]);
      const text = cli('guests');
      assert.equal(text.status, 0, text.stderr);
      assert.match(text.stdout, new RegExp(`^op-guest\\s+pid ${g.pid}\\s+idle\\s+32 MiB in 1 region `, 'm'));
      const lines = cli('guests', '--json').stdout.trim().split('\n');
      assert.equal(lines.length, 1);
      assert.deepEqual([(JSON.parse(lines[0]!) as { name: string }).name, (JSON.parse(lines[0]!) as { pid: number }).pid], ['op-guest', g.pid]);
      const one = cli('guests', 'op-guest', '--json');
      assert.equal((JSON.parse(one.stdout) as { pid: number }).pid, g.pid);
      const nobody = cli('guests', 'nobody');
      assert.equal(nobody.status, 1);
      assert.match(nobody.stderr, /ERR_LIVEMIG_NOT_FOUND/);
      for (const args of [['status'], ['guests'], ['guests', '--json']]) {
        const r = await withClosedStdout([...args, '--api', a.api]);
        assert.deepEqual([r.status, r.signal], [0, null], `livemig ${args.join(' ')}: ${r.stderr}`);
        assert.equal(r.stderr, '');
      }

      // 1 MiB/s, and its post-copy push too: neither ends before post-copy is asked twice; then the caps are lifted
      const m = cli('migrate', 'op-guest', '--to', `127.0.0.1:${b.port}`, '--bandwidth', '1', '--postcopy-bandwidth', '1', '--json');
      assert.equal(m.status, 0, m.stderr);
      const id = String(lastJson(m.stdout)['id']);
      const asked = cli('postcopy', id, '--json');
      assert.equal(asked.status, 0, asked.stderr);
      assert.equal(lastJson(asked.stdout)['id'], id);
      const textual = cli('postcopy', id);
      assert.equal(textual.status, 0, 'asking twice changes nothing');
      assert.match(textual.stdout, new RegExp(`^migration ${id}: post-copy asked \\(running, `));
      assert.equal(cli('set', id, '--bandwidth', '100000', '--postcopy-bandwidth', '100000').status, 0);
      const view = await settled(A, id);
      assert.equal(view['state'], 'completed', JSON.stringify(view['error']));
      const report = view['report'] as { stop_reason: string; postcopy?: { max_bandwidth_mib_s: number } };
      assert.match(report.stop_reason, /post-copy requested/);
      assert.equal(report.postcopy?.max_bandwidth_mib_s, 100000, "the report has its post-copy phase, at the push's own cap as set last");
      const late = cli('postcopy', id);
      assert.equal(late.status, 1);
      assert.match(late.stderr, /ERR_LIVEMIG_STATE.*completed already/);
      const there = (await request<{ migrations: { guest_pid?: number }[] }>({ socketPath: b.socketPath }, 'GET', '/v1/migrations')).body.migrations;
      for (const x of there) if (x.guest_pid) pids.push(x.guest_pid);
    } finally {
      await a.stop();
      await b.stop();
    }
  },
);
