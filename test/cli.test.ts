/**
 * The command line as a new user meets it: every command has its own help, a usage error
 * names its stage and exits 2 like an unknown command, and nothing starts a guest for them.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { opensslMissing } from './certs.js';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};
/** a bound for a CLI call that must end by itself: generous, so that a loaded host changes how long it takes, not the verdict */
const CALL_BOUND_MS = 300_000;
const run = (...args: string[]) =>
  spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: CALL_BOUND_MS, env: { ...process.env, LIVEMIG_SLICE_US: '0' } });

/** The receiver's next line that is an outcome ({received} or {error}), past its progress lines ({receiving}). */
async function outcomeLine(lines: AsyncIterator<string>): Promise<Record<string, unknown>> {
  for (;;) {
    const m = JSON.parse((await lines.next()).value as string) as Record<string, unknown>;
    if (!('receiving' in m)) return m;
  }
}

test("each command's --help prints its own usage and flags, and exits 0", () => {
  for (const [cmd, flag] of [
    ['demo', '--downtime-limit'],
    ['send', '--to'],
    ['receive', '--listen'],
    ['guest', '--socket'],
    ['probe', '--json'],
    ['keys', '--out'],
  ] as const) {
    const r = run(cmd, '--help');
    assert.equal(r.status, 0, `${cmd} --help exits 0`);
    assert.match(r.stdout, new RegExp(`^usage: livemig ${cmd} `), `${cmd}: its own usage line`);
    assert.ok(r.stdout.includes(flag), `${cmd}: lists ${flag}`);
    assert.ok(!r.stdout.includes('commands:'), `${cmd}: not the global usage`);
    assert.deepEqual(run('help', cmd).stdout, r.stdout, `livemig help ${cmd} says the same`);
  }
});

test('usage errors name the usage stage and exit 2, as an unknown command does', () => {
  const cases: [string[], RegExp][] = [
    [['demo', '--size', '4097'], /ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): --size must be a multiple of 4 KiB/],
    [['demo', '--content', 'foo'], /ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): --content must be one of/],
    [['guest', '--socket', '/tmp/livemig-never.sock', '--beat-ms', '0'], /\(usage\): --beat-ms: '0' must be a number >= 1/],
    [['send', '--to', '127.0.0.1:1', '--beat-ms', '2.5'], /\(usage\): --beat-ms must be a whole number of ms from 1 to 100/],
    [['send'], /ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): send needs --to HOST:PORT/],
    [['send', '--to', 'nowhere'], /\(usage\): --to: expected HOST:PORT/],
    [['demo', '--bogus'], /\(usage\): demo: Unknown option '--bogus'/],
    [['receive', 'stray'], /\(usage\): receive: .*stray/],
    [['receive', '--disk-dir', '/proc/livemig-no-such-dir'], /\(usage\): --disk-dir \/proc\/livemig-no-such-dir: ENOENT/],
    [['receive', '--disk-dir', '/proc/self/status'], /\(usage\): --disk-dir \/proc\/self\/status is not a directory/],
    [['send', '--to', '127.0.0.1:1', '--read-path', 'psychic'], /\(usage\): --read-path must be auto, mapping or files/],
    [['receive', '--listen', '0.0.0.0:0'], /ERR_LIVEMIG_INSECURE \(validate\): listening on 0\.0\.0\.0 without credentials.*--insecure/],
    [['send', '--to', '10.11.12.13:7878', '--size', '16MiB'], /ERR_LIVEMIG_INSECURE \(validate\): migrating to 10\.11\.12\.13 without credentials/],
    [['guest'], /\(usage\): guest needs one of --socket PATH and --register PATH/],
    [['guest', '--register', '/tmp/x.sock', '--name', 'bad name'], /\(usage\): --name must be 1\.\.63 characters/],
    [['migrate'], /\(usage\): migrate needs one GUEST name/],
    [['migrate', 'g1'], /\(usage\): migrate needs --to HOST:PORT/],
    [['migrate', 'g1', '--to', '127.0.0.1:1', '--mode', 'teleport'], /\(usage\): --mode must be precopy, postcopy or hybrid/],
    [['status', 'a', 'b'], /\(usage\): status takes at most one migration ID/],
    [['watch'], /\(usage\): watch needs one migration ID/],
    [['cancel'], /\(usage\): cancel needs one migration ID/],
    [['set', 'x'], /\(usage\): set needs --bandwidth, --postcopy-bandwidth or --downtime-limit/],
    [['status', '--api', 'unix:'], /\(usage\): --api: a unix socket path is 1\.\.107 characters/],
    [['serve', '--api', '127.0.0.1:0'], /ERR_LIVEMIG_INSECURE \(validate\): the API on TCP .* needs a bearer token/],
    [['demo', '--daemon', '--local'], /\(usage\): --daemon runs the reference guest/],
    [['receive', '--guest-exec', 'my-vmm --incoming'], /\(usage\): --guest-exec: the command must name its socket with \{socket\}/],
    [['demo', '--guest', 'rust'], /\(usage\): --guest must be reference or c/],
    [['bogus'], /unknown command 'bogus'/],
    [[], /usage: livemig <command>/],
  ];
  for (const [args, message] of cases) {
    const r = run(...args);
    assert.equal(r.status, 2, `livemig ${args.join(' ')} exits 2 (stderr: ${r.stderr})`);
    assert.match(r.stderr, message, `livemig ${args.join(' ')}`);
    assert.ok(!r.stderr.includes('unknown phase'), 'every error names its stage');
  }
});

test(
  'keys psk writes a key file that send and receive take with --psk-file: the migration runs authenticated; a wrong key fails both with ' +
    'ERR_LIVEMIG_AUTH before any page',
  async () => {
    const { mkdtempSync, writeFileSync, rmSync, statSync, readFileSync } = await import('node:fs');
    const os = await import('node:os');
    const { spawn } = await import('node:child_process');
    const { createInterface } = await import('node:readline');
    const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-psk-'));
    try {
      const good = path.join(dir, 'good.psk');
      const bad = path.join(dir, 'bad.psk');
      // the good key from `livemig keys psk`: a new random key, owner-only, never overwritten
      const made = run('keys', 'psk', '--out', good, '--identity', 'src');
      assert.equal(made.status, 0, made.stderr);
      assert.equal(statSync(good).mode & 0o777, 0o600, 'the key file is readable by its owner only');
      assert.match(readFileSync(good, 'utf8'), /^src:[0-9a-f]{64}\n$/);
      const again = run('keys', 'psk', '--out', good);
      assert.equal(again.status, 2, 'an existing key file is never overwritten');
      writeFileSync(bad, `src:${'cd'.repeat(32)}\n`, { mode: 0o600 });
      const env = { ...process.env, LIVEMIG_SLICE_US: '0' };
      const attempt = async (
        senderKey: string,
      ): Promise<{ rx: Record<string, unknown>; tx: ReturnType<typeof spawnSync>; sent: { source_guest?: string; guest_pid?: number; alive?: boolean } }> => {
        const receiver = spawn(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0', '--psk-file', good], {
          stdio: ['ignore', 'pipe', 'inherit'],
          env,
        });
        const lines = createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]();
        const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
        const tx = spawnSync(
          process.execPath,
          [CLI, 'send', '--to', `127.0.0.1:${port}`, '--psk-file', senderKey, '--size', '16MiB', '--rate', '0', '--json'],
          {
            encoding: 'utf8',
            timeout: CALL_BOUND_MS,
            env,
          },
        );
        const rx = await outcomeLine(lines);
        receiver.kill();
        const guestPid = (rx as { guest_pid?: number }).guest_pid;
        if (guestPid) process.kill(guestPid, 'SIGTERM');
        // a failed send leaves its guest running: this test stops it
        const sent = JSON.parse(String(tx.stdout).trim().split('\n').at(-1) ?? '{}') as { source_guest?: string; guest_pid?: number; alive?: boolean };
        if (tx.status !== 0 && sent.guest_pid) {
          sent.alive = alive(sent.guest_pid);
          process.kill(sent.guest_pid, 'SIGTERM');
        }
        return { rx, tx, sent };
      };
      const ok = await attempt(good);
      assert.equal(ok.tx.status, 0, String(ok.tx.stderr));
      const report = JSON.parse(String(ok.tx.stdout).trim().split('\n').at(-1)!) as { verified: boolean; security: { auth: string; peer: string } };
      assert.equal(report.verified, true);
      assert.deepEqual([report.security.auth, report.security.peer], ['tls-psk', 'src']);
      assert.equal((ok.rx as { received: { security: { auth: string } } }).received.security.auth, 'tls-psk');
      const refused = await attempt(bad);
      assert.equal(refused.tx.status, 1, 'the sender fails');
      assert.match(String(refused.tx.stderr), /ERR_LIVEMIG_AUTH/);
      assert.match(String(refused.tx.stderr), /the pre-shared keys differ/, "the sender is told what differs, not OpenSSL's alert");
      const line = (refused.rx as { refused: { code: string; reason: string; from: string } }).refused;
      assert.equal(line.code, 'ERR_LIVEMIG_AUTH', 'the receiver refused before reserving, and goes on listening');
      assert.equal(line.reason, 'psk-mismatch', 'the receiver logs why');
      assert.match(line.from, /^127\.0\.0\.1:\d+$/, 'and where the source connected from');
      assert.equal(refused.sent.source_guest, 'running', 'the failed send reports its guest running, and leaves it so');
      assert.equal(refused.sent.alive, true, 'the guest was still running after send exited');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

test(
  'keys ca writes a test CA whose certificates send and receive take (--tls-*): the migration is authenticated both ways and encrypted; demo --secure ' +
    'reports the same',
  { skip: opensslMissing },
  async () => {
    const { mkdtempSync, rmSync, statSync, readdirSync } = await import('node:fs');
    const os = await import('node:os');
    const { spawn } = await import('node:child_process');
    const { createInterface } = await import('node:readline');
    const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-ca-cli-'));
    try {
      const made = run('keys', 'ca', '--out', dir, '--names', 'src,dst', '--days', '1');
      assert.equal(made.status, 0, made.stderr);
      assert.deepEqual(readdirSync(dir).sort(), ['ca.crt', 'ca.key', 'dst.crt', 'dst.key', 'src.crt', 'src.key']);
      for (const k of ['ca.key', 'src.key', 'dst.key']) assert.equal(statSync(path.join(dir, k)).mode & 0o777, 0o600, `${k} is readable by its owner only`);
      assert.equal(run('keys', 'ca', '--out', dir, '--names', 'other').status, 2, 'nothing is overwritten (ca.crt exists)');
      assert.match(
        run('keys', 'ca', '--out', dir, '--names', 'a/CN=b').stderr,
        /must be 1\.\.63 letters/,
        'a name that is not a host name is refused before openssl sees it',
      );
      const f = (n: string): string => path.join(dir, n);
      const env = { ...process.env, LIVEMIG_SLICE_US: '0' };
      const receiver = spawn(
        process.execPath,
        [CLI, 'receive', '--listen', '127.0.0.1:0', '--tls-cert', f('dst.crt'), '--tls-key', f('dst.key'), '--tls-ca', f('ca.crt'), '--allow', 'src'],
        { stdio: ['ignore', 'pipe', 'inherit'], env },
      );
      const lines = createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]();
      const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
      const tx = spawnSync(
        process.execPath,
        [
          CLI,
          'send',
          '--to',
          `127.0.0.1:${port}`,
          '--tls-cert',
          f('src.crt'),
          '--tls-key',
          f('src.key'),
          '--tls-ca',
          f('ca.crt'),
          '--peer-name',
          'dst',
          '--size',
          '16MiB',
          '--rate',
          '0',
          '--json',
        ],
        { encoding: 'utf8', timeout: CALL_BOUND_MS, env },
      );
      const rx = (await outcomeLine(lines)) as { guest_pid?: number; received: { security: { auth: string; peer: string; encrypted: boolean } } };
      receiver.kill();
      if (rx.guest_pid) process.kill(rx.guest_pid, 'SIGTERM');
      assert.equal(tx.status, 0, tx.stderr);
      const report = JSON.parse(tx.stdout.trim().split('\n').at(-1)!) as { verified: boolean; security: { auth: string; peer: string; encrypted: boolean } };
      assert.equal(report.verified, true);
      assert.deepEqual(report.security, { ...report.security, auth: 'tls-cert', peer: 'dst', encrypted: true });
      assert.deepEqual([rx.received.security.auth, rx.received.security.peer, rx.received.security.encrypted], ['tls-cert', 'src', true]);
      const demo = run('demo', '--secure', '--size', '32MiB', '--json');
      assert.equal(demo.status, 0, demo.stderr);
      const d = JSON.parse(demo.stdout.trim().split('\n').at(-1)!) as {
        verified: boolean;
        security: { auth: string; peer: string; encrypted: boolean };
        downtime_ms: number;
        downtime_limit_ms: number;
        downtime_limit_met: boolean;
        guest_downtime_ms: number;
      };
      assert.deepEqual([d.verified, d.security.auth, d.security.peer, d.security.encrypted], [true, 'tls-cert', 'dst', true]);
      // both downtimes: the source's measure, with its verdict, and the guest's own gap across the pause
      assert.equal(d.downtime_limit_met, d.downtime_ms <= d.downtime_limit_ms);
      assert.ok(d.guest_downtime_ms > 0, `the guest felt ${d.guest_downtime_ms} ms`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

test('probe --json says whether the kernel has TLS offload, that livemig does not use it, and why', () => {
  const r = run('probe', '--json');
  assert.equal(r.status, 0, r.stderr);
  const p = JSON.parse(r.stdout) as { tracking: { backend: string }[]; kernel_tls: { available: boolean; used: boolean; reason: string } };
  assert.ok(p.tracking.some((t) => t.backend === 'uffd-async'));
  assert.equal(p.kernel_tls.used, false);
  assert.match(p.kernel_tls.reason, p.kernel_tls.available ? /not used/ : /ENOENT|fails with|could not/);
  // and the disk features where images would live: each tried, each with its reason
  const d = (JSON.parse(run('probe', '--json', '--disk-dir', tmpdir()).stdout) as { disk: { feature: string; available: boolean; reason: string }[] }).disk;
  assert.deepEqual(
    d.map((f) => f.feature),
    ['reflink', 'extents', 'precontent'],
  );
  for (const f of d) assert.ok(f.reason.length > 10, `${f.feature}: ${f.reason}`);
});

test('receive goes on listening after connections refused before anything was reserved (a bare connect, junk), then serves a migration', async () => {
  const { spawn } = await import('node:child_process');
  const { createInterface } = await import('node:readline');
  const net = await import('node:net');
  const env = { ...process.env, LIVEMIG_SLICE_US: '0' };
  const receiver = spawn(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'], env });
  const lines = createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]();
  try {
    const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
    const poke = (bytes?: Buffer): Promise<void> =>
      new Promise((resolve) => {
        const s = net.connect(port, '127.0.0.1', () => (bytes ? s.end(bytes) : s.end()));
        s.on('error', () => resolve());
        s.on('close', () => resolve());
      });
    await poke(); // a port scan
    const first = JSON.parse((await lines.next()).value as string) as { refused?: { code: string } };
    assert.ok(first.refused, `a bare connect is refused and reported: ${JSON.stringify(first)}`);
    await poke(Buffer.from('GET / HTTP/1.1\r\n\r\n')); // something else entirely
    const second = JSON.parse((await lines.next()).value as string) as { refused?: { code: string; message: string } };
    assert.equal(second.refused?.code, 'ERR_LIVEMIG_PROTOCOL', JSON.stringify(second));
    const tx = spawnSync(process.execPath, [CLI, 'send', '--to', `127.0.0.1:${port}`, '--size', '16MiB', '--rate', '0', '--json'], {
      encoding: 'utf8',
      timeout: CALL_BOUND_MS,
      env,
    });
    assert.equal(tx.status, 0, tx.stderr);
    const done = (await outcomeLine(lines)) as { received?: { digest: string }; guest_pid?: number };
    assert.ok(done.received, 'the migration after them was served');
    if (done.guest_pid) process.kill(done.guest_pid, 'SIGTERM');
  } finally {
    receiver.kill();
  }
});
