/**
 * A QEMU VM's disk moves with it (issue 34): a raw image on local storage, which the VM's
 * workload (contrib/qemu-guest, memwriter.disk_mib) writes checkable blocks to with O_DIRECT all
 * through the migration, then reads back at the destination block by block. The blocks the
 * pause carried are the writes QEMU drained and flushed when it stopped the VM: the check
 * passing with some of them proves the flush came before the last collect. Tracked by hashing
 * on the plain filesystem, by clones on XFS. A qcow2 disk, and a destination that places other
 * disks, are refused before anything moves, the VM running on.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { qemuReceiver, qemuSender } from '../src/demo/qemu-demo.js';
import { DISK_ID, Serial, SourceVm, qemuUnavailable, vmStatus, type VmOptions } from '../src/demo/qemu-vm.js';
import { QmpClient } from '../src/vmm/qemu/qmp.js';
import { disksMismatch, placeDisks, placedDisks, qemuDisks } from '../src/vmm/qemu/disks.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../src/cli/main.js');
const unavailable = qemuUnavailable();
if (unavailable) console.log(`# QEMU disk tests skipped: ${unavailable}`);

type Json = Record<string, unknown>;
const DISK_MIB = 32;
/** MiB/s of 4 KiB O_DIRECT writes: about 500 a second, so some fall between the last round and the pause */
const DISK_RATE = 2;

/** A raw (or other format) image of the disk's size in `dir`. */
function image(dir: string, format = 'raw'): string {
  const file = path.join(dir, `disk.${format}`);
  if (format === 'raw') execFileSync('truncate', ['-s', `${DISK_MIB}M`, file]);
  else execFileSync('qemu-img', ['create', '-q', '-f', format, file, `${DISK_MIB}M`]);
  return file;
}

function diskOptions(file: string, format = 'raw'): VmOptions {
  return { disk: { path: file, mib: DISK_MIB, rate: DISK_RATE, format } };
}

/** Waits until `serial` counted more disk writes than `than`: the guest writes on. */
async function writesPast(serial: Serial, than: number): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (serial.diskWrites <= than) {
    if (Date.now() > deadline) throw new Error(`no disk write past ${than} within 30 s (the last count: ${serial.diskWrites})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('receive --qemu-exec with disks', () => {
  test('a command that places a disk needs --disk-dir, where its image is created', () => {
    const r = spawnSync(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0', '--qemu-exec', 'qemu mem-path={memory} -drive file={disk:vda}'], {
      encoding: 'utf8',
    });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /places disk\(s\) vda: --disk-dir DIR/);
  });

  test('a placeholder whose name is no disk name is refused', () => {
    const r = spawnSync(process.execPath, [CLI, 'receive', '--listen', '127.0.0.1:0', '--qemu-exec', 'qemu mem-path={memory} -drive file={disk:a,b}'], {
      encoding: 'utf8',
    });
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /\{disk:a,b\}: a disk's name is 1\.\.63 characters/);
  });
});

/** A QMP client that answers query-block and query-named-block-nodes as given. */
function fakeQmp(blocks: unknown[], nodes: unknown[]): QmpClient {
  const answers: Record<string, unknown> = { 'query-block': blocks, 'query-named-block-nodes': nodes };
  return { pid: process.pid, execute: (command: string) => Promise.resolve(answers[command]) } as unknown as QmpClient;
}

const rawNode = (file: string, size = DISK_MIB << 20): Json => ({
  drv: 'raw',
  file,
  'node-name': '#block1',
  backing_file_depth: 0,
  image: { 'virtual-size': size },
});
const fileNode = (file: string, size = DISK_MIB << 20): Json => ({ drv: 'file', file, 'node-name': '#block2', image: { 'virtual-size': size } });

describe("a QEMU VM's drives as livemig reads them", () => {
  test('drives without a medium are no disks; a VM without any has none', async () => {
    assert.deepEqual(await qemuDisks(fakeQmp([{ device: 'ide1-cd0' }, { device: 'floppy0' }], [])), []);
  });

  test('a backing chain, network storage, part of a file and a drive without a name are refused, each naming the disk', async () => {
    const cases: [unknown, unknown[], RegExp][] = [
      [
        { device: 'vda', inserted: { ...rawNode('/i/top.qcow2'), drv: 'qcow2', backing_file: '/i/base.raw', backing_file_depth: 1 } },
        [],
        /^disk vda: \/i\/top\.qcow2 has a backing chain \(\/i\/base\.raw\)/,
      ],
      [{ device: 'vda', inserted: rawNode('nbd+unix:///vm1?socket=/run/nbd.sock') }, [], /^disk vda: "nbd\+unix:.*" is not a local file or block device/],
      [
        { device: 'vda', inserted: rawNode('/i/vm1.raw') },
        [{ ...fileNode('/i/vm1.raw'), drv: 'nbd' }],
        /^disk vda: \/i\/vm1\.raw is not a local file or block device QEMU opened/,
      ],
      [
        { device: 'vda', inserted: rawNode('/i/vm1.raw', 1 << 20) },
        [fileNode('/i/vm1.raw')],
        /the raw node is 1048576 bytes of a 33554432-byte \/i\/vm1\.raw \(offset= or size=\)/,
      ],
      [{ device: '', inserted: rawNode('/i/vm1.raw') }, [fileNode('/i/vm1.raw')], /^disk #block1: name it \(-drive id=NAME/],
    ];
    for (const [block, nodes, message] of cases) await assert.rejects(qemuDisks(fakeQmp([block], nodes)), { code: 'ERR_LIVEMIG_QEMU', message });
  });

  test("the destination's places must be the source's disks, each once, on a plain path", () => {
    assert.equal(disksMismatch(['vda', 'vdb'], ['vdb', 'vda']), undefined);
    assert.match(disksMismatch(['vda'], [])!, /vda have no place/);
    assert.match(disksMismatch([], ['vda'])!, /places disk\(s\) vda, which the source VM does not have/);
    assert.deepEqual(placedDisks(['-drive', 'file={disk:vda},format=raw', 'x={disk:data.1}']), ['vda', 'data.1']);
    assert.throws(() => placedDisks(['{disk:vda} {disk:vda}']), /appears twice/);
    assert.equal(placeDisks('file={disk:vda},format=raw', [{ name: 'vda', path: '/d/vda.img' }]), 'file=/d/vda.img,format=raw');
    assert.throws(() => placeDisks('file={disk:vda}', [{ name: 'vda', path: '/d,x/vda.img' }]), /not a plain absolute path/);
  });
});

describe('a QEMU VM with a raw disk on the plain filesystem', { skip: unavailable ?? false }, () => {
  let dir: string;
  let vm: SourceVm;
  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'livemig-qdisk-'));
    vm = await SourceVm.boot(diskOptions(image(dir)));
  });
  after(() => {
    vm?.cleanup();
    rmSync(dir, { recursive: true, force: true });
  });

  test('a destination whose command places another disk is refused before anything moves; the VM runs on', async () => {
    const out = path.join(dir, 'refused');
    mkdirSync(out);
    const line = vm.destination().line.replace(`{disk:${DISK_ID}}`, '{disk:vdb}');
    const rx = await qemuReceiver(line, {}, ['--disk-dir', out]);
    try {
      const { code, out: report } = await qemuSender(vm.qmp, rx.port).done;
      assert.equal(code, 1);
      const error = report['error'] as { code: string; message: string };
      assert.match(error.message, /the source VM's disk\(s\) vda have no place in the QEMU command \(\{disk:vda\}\)/);
      assert.match(error.message, /places disk\(s\) vdb, which the source VM does not have/);
      assert.equal(report['source_guest'], 'running');
      assert.ok(!rx.lines.some((l) => 'receiving' in l), `nothing was reserved: ${JSON.stringify(rx.lines)}`);
      assert.equal(existsSync(path.join(out, 'vda.img')), false, 'no image was created');
    } finally {
      rx.child.kill();
    }
    const writes = vm.serial.diskWrites;
    await writesPast(vm.serial, writes);
    assert.equal((await vmStatus(vm.qmp)).status, 'running');
  });

  test('post-copy with disks is refused before anything moves; the VM runs on', async () => {
    const { code, out } = await qemuSender(vm.qmp, 1, ['--mode', 'hybrid']).done; // refused before it connects anywhere
    assert.equal(code, 1);
    assert.deepEqual(out['error'], {
      code: 'ERR_LIVEMIG_UNSUPPORTED',
      phase: 'validate',
      message: '--mode hybrid: the VM has disks (vda), which move into QEMU by pre-copy only so far (docs/QEMU.md)',
    });
    assert.equal(out['source_guest'], 'running');
    await writesPast(vm.serial, vm.serial.diskWrites);
    assert.equal((await vmStatus(vm.qmp)).status, 'running');
  });

  test('it moves live while writing to its disk, tracked by hashing: every block checks at the destination', async () => {
    const { out } = await migrateWithDisk(vm, dir);
    assert.match(String(out['tracker_reason']), /disk vda: hash: .* cannot be cloned here/);
    assert.match(String(out['tracker_reason']), /QEMU marks its writes only in dirty bitmaps it serves over NBD/);
  });
});

const noXfs =
  process.getuid?.() !== 0
    ? 'making an XFS filesystem on a loop file needs root'
    : spawnSync('sh', ['-c', 'command -v mkfs.xfs && command -v losetup'], { stdio: 'ignore' }).status !== 0
      ? 'mkfs.xfs or losetup is not installed (xfsprogs)'
      : undefined;

describe('a QEMU VM with a raw disk on XFS', { skip: unavailable ?? noXfs ?? false }, () => {
  test('it moves live while writing to its disk, tracked by clones: every block checks at the destination', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-qdisk-xfs-'));
    const backing = path.join(dir, 'fs.img');
    const mnt = path.join(dir, 'mnt');
    execFileSync('truncate', ['-s', '512M', backing]); // XFS needs 300 MiB at least
    execFileSync('mkfs.xfs', ['-q', '-m', 'reflink=1', backing]);
    mkdirSync(mnt);
    execFileSync('mount', ['-o', 'loop', backing, mnt]);
    let vm: SourceVm | undefined;
    try {
      vm = await SourceVm.boot(diskOptions(image(mnt)));
      const { out } = await migrateWithDisk(vm, dir);
      assert.match(String(out['tracker_reason']), /disk vda: reflink: .* clones files \(FICLONE\)/);
    } finally {
      vm?.cleanup();
      execFileSync('umount', [mnt]);
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('a QEMU VM with a qcow2 disk', { skip: unavailable ?? false }, () => {
  test('is refused with the reason before anything moves; the VM runs on', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-qdisk-qcow2-'));
    const file = image(dir, 'qcow2');
    const vm = await SourceVm.boot(diskOptions(file, 'qcow2'));
    const out = path.join(dir, 'received');
    mkdirSync(out);
    const rx = await qemuReceiver(vm.destination().line, {}, ['--disk-dir', out]);
    try {
      const { code, out: report } = await qemuSender(vm.qmp, rx.port).done;
      assert.equal(code, 1);
      assert.deepEqual(report['error'], {
        code: 'ERR_LIVEMIG_QEMU',
        phase: 'qemu',
        message: `disk vda: ${file} is qcow2 (livemig moves raw images on local storage only; qemu-img convert -O raw makes one)`,
      });
      assert.equal(report['source_guest'], 'running');
      assert.ok(!rx.lines.some((l) => 'receiving' in l), `nothing was reserved: ${JSON.stringify(rx.lines)}`);
      const writes = vm.serial.diskWrites;
      await writesPast(vm.serial, writes);
      assert.equal((await vmStatus(vm.qmp)).status, 'running');
      assert.equal((await vmStatus(vm.qmp)).ignoreShared, false, 'QEMU was not prepared for a migration');
    } finally {
      rx.child.kill();
      vm.cleanup();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/**
 * Moves `vm` live with its disk (receive --qemu-exec ... {disk:vda} --disk-dir, send --qemu);
 * at the destination the guest writes on, and its RAM and disk checks pass. Returns send's report.
 */
async function migrateWithDisk(vm: SourceVm, dir: string): Promise<{ out: Json }> {
  const to = vm.destination();
  const disks = path.join(dir, 'received');
  mkdirSync(disks);
  const rx = await qemuReceiver(to.line, {}, ['--disk-dir', disks]);
  const destination = new Serial();
  try {
    const before = vm.serial.diskWrites;
    await writesPast(vm.serial, before);
    const tx = qemuSender(vm.qmp, rx.port);
    // a sender that fails before the receiver heard of it says why, rather than leave the wait forever
    const failed = tx.done.then(({ out }) => Promise.reject(new Error(`send ended first: ${JSON.stringify(out)}`)));
    failed.catch(() => undefined);
    await Promise.race([rx.next('receiving'), failed]);
    const heard = destination.attach(to.serial);
    const { code, out } = await tx.done;
    assert.equal(code, 0, JSON.stringify(out));
    const received = await rx.next('received');
    await heard;
    assert.deepEqual(
      (out['disks'] as Json[]).map((d) => [d['name'], d['bytes']]),
      [[DISK_ID, DISK_MIB << 20]],
    );
    const pause = out['stop_and_copy'] as { disk_blocks?: number };
    assert.ok((pause.disk_blocks ?? 0) > 0, `the pause carried blocks written after the last round: ${JSON.stringify(pause)}`);
    assert.equal(statSync(path.join(disks, `${DISK_ID}.img`)).size, DISK_MIB << 20);
    const sourceWrites = vm.serial.diskWrites;
    await writesPast(destination, sourceWrites); // the guest writes on, at the destination
    const disk = await destination.dcheck();
    assert.deepEqual({ ...disk, written: undefined }, { blocks: (DISK_MIB << 20) / 4096, written: undefined, bad: 0, firstBad: -1, errors: 0 });
    assert.ok(disk.written > 0, 'the guest wrote blocks');
    assert.deepEqual(await destination.check(), { pages: 16384, bad: 0, firstBad: -1 });
    process.kill(received['guest_pid'] as number, 'SIGKILL');
    return { out };
  } finally {
    destination.close();
    rx.child.kill();
  }
}
