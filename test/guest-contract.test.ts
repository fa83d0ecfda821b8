/**
 * The guest contract's checks (docs/GUEST.md): a hello livemig cannot trust is refused with a
 * clear error before anything moves, and the guest that sent it runs on; a same-host upgrade
 * asked of another host is refused the same way.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { GuestLayout, MAX_GUEST_REGIONS, REGION_NAME } from '../src/guest/layout.js';
import { GUEST_CONTRACT, GUEST_CONTRACT_OLDEST, MAX_HELLO_BYTES, MAX_MESSAGE_BODY, Tag, parseSourceHello } from '../src/guest/contract.js';
import { addon } from '../src/native.js';
import { SourceGuestSession } from '../src/guest/source-session.js';
import { LivemigError } from '../src/errors.js';
import { Region } from '../src/region/region.js';
import { fixture } from './helpers.js';

test('the addon (native/guest/livemig_guest.h) and src/guest/contract.ts agree on the version, every limit and every tag', () => {
  const n = addon.guestContract();
  assert.deepEqual(
    { contract: n.contract, oldestContract: n.oldestContract, maxRegions: n.maxRegions, maxBody: n.maxBody, maxHello: n.maxHello },
    { contract: GUEST_CONTRACT, oldestContract: GUEST_CONTRACT_OLDEST, maxRegions: MAX_GUEST_REGIONS, maxBody: MAX_MESSAGE_BODY, maxHello: MAX_HELLO_BYTES },
  );
  assert.ok(REGION_NAME.test('n'.repeat(n.nameMaxLength)), `a name of ${n.nameMaxLength} characters is taken`);
  assert.ok(!REGION_NAME.test('n'.repeat(n.nameMaxLength + 1)), `a name of ${n.nameMaxLength + 1} characters is refused`);
  const upperSnake = (key: string): string => key.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase();
  assert.deepEqual(n.tags, Object.fromEntries(Object.entries(Tag).map(([k, v]) => [upperSnake(k), v])), 'LMG_TAG_* and Tag');
  assert.equal(new Set(Object.values(n.tags)).size, Object.keys(n.tags).length, 'no two tags share a byte');
});

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');

async function hostileGuest(kind: string): Promise<{ child: ChildProcess; socket: string; served: AsyncIterator<string>; stop(): void }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-hostile-'));
  const socket = path.join(dir, 'guest.sock');
  const child = spawn(process.execPath, [fixture('hostile-guest.js'), socket, kind], { stdio: ['ignore', 'pipe', 'inherit'] });
  const served = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const first = await served.next();
  if (first.done) throw new Error(`the hostile guest (${kind}) exited before it listened`);
  return {
    child,
    socket,
    served,
    stop: () => {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

const refusals: [string, RegExp][] = [
  ['overlap', /regions r0 and r1 overlap in the guest/],
  ['misaligned', /region r0: address \d+ is not page-aligned/],
  ['short-memfd', /region r0: its memfd holds 2097152 bytes, fewer than offset 0 \+ size 4194304/],
  ['too-many', /33 regions, more than the limit of 32/],
  ['missing-fd', /2 regions and 0 disks \(0 reported\) need 2 descriptors \(a memfd per region, .*\), the hello carried 1/],
  ['version', new RegExp(`the guest speaks contract 1, this livemig ${GUEST_CONTRACT_OLDEST}\\.\\.${GUEST_CONTRACT}`)],
  // a hostile disk table: refused before anything is reserved, the guest still running
  ['disk-old-contract', /disks come with contract 4, the session speaks 2/],
  ['disk-overlap', /disk a and disk b are the same file/],
  ['disk-is-memory', /region r1 and disk a are the same file/],
  ['disk-oversized', /disk 0 \(a\): size must be a positive multiple of 4096 bytes, at most/],
  ['disk-wrong-kind', /disk a: its descriptor is neither a file nor a block device/],
  ['disk-size-mismatch', /disk a: the image holds 1048576 bytes, its size says 2097152/],
  ['disk-no-bitmap', /2 regions and 1 disks \(1 reported\) need 4 descriptors/],
];

for (const [kind, message] of refusals) {
  test(`a hello with ${kind} is refused before anything moves, and the guest runs on`, async () => {
    const g = await hostileGuest(kind);
    try {
      // the receiver address is never reached: the hello is checked first
      const r = spawnSync(process.execPath, [CLI, 'send', '--guest', g.socket, '--to', '127.0.0.1:9', '--json'], { encoding: 'utf8', timeout: 30_000 });
      assert.equal(r.status, 1, r.stderr);
      const out = JSON.parse(r.stdout.trim()) as { error: { code: string; phase: string; message: string }; source_guest: string };
      assert.equal(out.error.code, 'ERR_LIVEMIG_HANDOVER');
      assert.equal(out.error.phase, 'handover');
      assert.match(out.error.message, message);
      assert.equal(out.source_guest, 'running');
      assert.doesNotMatch(r.stderr, /connect|ECONNREFUSED/, 'the receiver was never contacted');
      assert.equal(JSON.parse((await g.served.next()).value as string).served, kind, 'the guest served one livemig');
      assert.equal(g.child.exitCode, null, 'the guest runs on');
      // and it serves the next livemig as before (which refuses it again)
      await assert.rejects(SourceGuestSession.connect(g.socket), (e: LivemigError) => e.code === 'ERR_LIVEMIG_HANDOVER' && message.test(e.message));
      assert.equal(JSON.parse((await g.served.next()).value as string).served, kind);
    } finally {
      g.stop();
    }
  });
}

test('a well-formed hello of two regions is taken: both regions mapped back to back, the layout says where', async () => {
  const g = await hostileGuest('good');
  try {
    const s = await SourceGuestSession.connect(g.socket, { child: g.child });
    try {
      assert.deepEqual(
        s.layout.regions.map((r) => [r.name, r.size, r.firstPage]),
        [
          ['r0', 2 << 20, 0],
          ['r1', 1 << 20, 512],
        ],
      );
      assert.equal(s.region.size, 3 << 20);
      assert.deepEqual([s.hello.contract, s.hello.helloContract], [2, 2], 'a guest of the version before is taken, and spoken to in it');
      assert.equal(s.tracking, 'none');
      assert.deepEqual(s.memory.untracked, true, 'a guest without tracking is hashed');
    } finally {
      s.close();
    }
  } finally {
    g.stop();
  }
});

test('the hello parser refuses what the fixture cannot send', () => {
  const r = Region.create(4 * 4096);
  try {
    const base = {
      contract: 2,
      role: 'source',
      pid: 42,
      name: 'g',
      regions: [{ id: 0, name: 'ram', size: 4 * 4096, pageSize: 4096, address: '4096000', offset: 0, tracking: 'none' }],
    };
    const parse = (o: object, fds = [r.fd]) => parseSourceHello(Buffer.from(JSON.stringify({ ...base, ...o })), fds);
    assert.equal(parse({}).layout.pageCount, 4);
    const cases: [object, RegExp][] = [
      [{ role: 'incoming' }, /role "incoming"/],
      [{ pid: 0 }, /pid 0/],
      [{ name: 'a b' }, /name must be/],
      [{ regions: [] }, /non-empty list/],
      [{ regions: [{ ...base.regions[0], pageSize: 65536 }] }, /page size 65536/],
      [{ regions: [{ ...base.regions[0], tracking: 'soft' }] }, /tracking "soft" is unknown/],
      [{ regions: [{ ...base.regions[0], offset: 100 }] }, /offset 100 is not page-aligned/],
      [{ regions: [{ ...base.regions[0], name: 'ram/0' }] }, /name must be 1\.\.63/],
    ];
    for (const [o, re] of cases)
      assert.throws(
        () => parse(o),
        (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_HANDOVER' && re.test(e.message),
        re.source,
      );
    assert.throws(() => parse({ regions: [base.regions[0], { ...base.regions[0], address: '8192000' }] }, [r.fd, r.fd]), /region id 0 appears twice/);
    assert.throws(() => parse({ regions: [base.regions[0], { ...base.regions[0], id: 1, address: '8192000' }] }, [r.fd, r.fd]), /overlap in their memfd/);
    assert.throws(() => parseSourceHello(Buffer.from('{"contract":2'), []), /not JSON/);
    // the session speaks the newest version in both ranges; one the two do not share is refused
    const agreed = (o: object) => {
      const h = parse(o);
      return [h.contract, h.helloContract];
    };
    assert.deepEqual(agreed({ contract: 2 }), [2, 2]);
    assert.deepEqual(agreed({ contract: 2, contractMax: 3 }), [3, 2]);
    assert.deepEqual(agreed({ contract: 2, contractMax: 9 }), [GUEST_CONTRACT, 2], "a guest newer than livemig is spoken to in livemig's newest");
    assert.deepEqual(agreed({ contract: 3 }), [3, 3]);
    const window = `${GUEST_CONTRACT_OLDEST}\\.\\.${GUEST_CONTRACT}`;
    const disagreements: [object, RegExp][] = [
      [{ contract: 1 }, new RegExp(`speaks contract 1, this livemig ${window}`)],
      [
        { contract: GUEST_CONTRACT + 1, contractMax: GUEST_CONTRACT + 2 },
        new RegExp(`speaks contract ${GUEST_CONTRACT + 1}\\.\\.${GUEST_CONTRACT + 2}, this livemig ${window}`),
      ],
      [{ contract: '2' }, /not a range of versions/],
      [{ contract: 3, contractMax: 2 }, /not a range of versions/],
    ];
    const handover = (re: RegExp) => (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_HANDOVER' && re.test(e.message);
    for (const [o, re] of disagreements) assert.throws(() => parse(o), handover(re), re.source);
  } finally {
    r.release();
  }
});

test('a layout splits pages by region and checks its table', () => {
  const l = GuestLayout.of([
    { id: 0, name: 'low', size: 3 * 4096 },
    { id: 7, name: 'high', size: 2 * 4096 },
  ]);
  assert.equal(l.pageCount, 5);
  assert.deepEqual(
    [0, 2, 3, 4].map((p) => l.regionOf(p)),
    [0, 0, 1, 1],
  );
  assert.deepEqual(l.breakdown(Uint32Array.of(0, 2, 3)), [2, 1]);
  assert.deepEqual(l.breakdown(Uint32Array.of(4), [1, 1]), [1, 2]);
  assert.throws(() => GuestLayout.of([]), /1\.\.32 regions/);
  assert.throws(() => GuestLayout.of([{ id: 0, name: 'x', size: 100 }]), /not a positive multiple of 4096/);
});

/** `cmd` in a mount namespace of its own whose boot id is another host's (a bind mount over /proc's). */
function elsewhere(cmd: string[]): { argv: string[]; cleanup(): void } | undefined {
  if (process.getuid?.() !== 0 || spawnSync('unshare', ['--mount', 'true']).status !== 0) return undefined;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-otherhost-'));
  writeFileSync(path.join(dir, 'boot_id'), '00000000-0000-4000-8000-000000000000\n');
  const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  const script = `mount --bind ${q(path.join(dir, 'boot_id'))} /proc/sys/kernel/random/boot_id && exec ${cmd.map(q).join(' ')}`;
  return { argv: ['unshare', '--mount', '--propagation', 'private', 'sh', '-c', script], cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

test('--local to a receiver on another host is refused before the pause, and the guest runs on', async (t) => {
  const other = elsewhere([process.execPath, CLI, 'receive', '--listen', '127.0.0.1:0', '--linger', '0']);
  if (!other) return t.skip('needs root and unshare --mount to stand in for another host');
  const receiver = spawn(other.argv[0]!, other.argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]();
  try {
    const { port } = JSON.parse((await lines.next()).value as string) as { port: number };
    const send = spawn(process.execPath, [CLI, 'send', '--to', `127.0.0.1:${port}`, '--size', '16MiB', '--local', '--json'], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const out = createInterface({ input: send.stdout! })[Symbol.asyncIterator]();
    const line = JSON.parse((await out.next()).value as string) as { error: { code: string; message: string }; source_guest: string; guest_pid: number };
    const [code] = (await once(send, 'exit')) as [number];
    assert.equal(code, 1);
    assert.equal(line.error.code, 'ERR_LIVEMIG_NOT_LOCAL', line.error.message);
    assert.match(line.error.message, /boot id/);
    assert.equal(line.source_guest, 'running', 'refused before the pause: the guest runs on');
    process.kill(line.guest_pid, 'SIGKILL'); // the started guest, left running by send
  } finally {
    receiver.kill('SIGKILL');
    other.cleanup();
  }
});
