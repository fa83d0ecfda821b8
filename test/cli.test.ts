/**
 * The command line as a new user meets it: every command has its own help, a usage error
 * names its stage and exits 2 like an unknown command, and nothing starts a guest for them.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const run = (...args: string[]) => spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 30_000, env: { ...process.env, LIVEMIG_SLICE_US: '0' } });

test("each command's --help prints its own usage and flags, and exits 0", () => {
  for (const [cmd, flag] of [['demo', '--downtime-limit'], ['send', '--to'], ['receive', '--listen'], ['probe', '--json']] as const) {
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
    [['send'], /ERR_LIVEMIG_INVALID_ARGUMENT \(usage\): send needs --to HOST:PORT/],
    [['send', '--to', 'nowhere'], /\(usage\): --to: expected HOST:PORT/],
    [['demo', '--bogus'], /\(usage\): demo: Unknown option '--bogus'/],
    [['receive', 'stray'], /\(usage\): receive: .*stray/],
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
