/**
 * A real QEMU VM (TCG) migrated by livemig (issue 34): livemig moves its RAM, QEMU's own stream
 * only its device state. The VM's workload (contrib/qemu-guest) rewrites 64 MiB of its RAM
 * while it moves and, at the destination, checks every page it wrote; its heartbeats must go on
 * there. A VM livemig cannot move, a destination that would load the wrong RAM, a cancel and a
 * stalled migration all leave the source VM running.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, test } from 'node:test';
import { qemuReceiver, qemuSender } from '../src/demo/qemu-demo.js';
import { QemuSource } from '../src/vmm/qemu/source.js';
import { Serial, SourceVm, qemuUnavailable, vmStatus } from '../src/demo/qemu-vm.js';

const unavailable = qemuUnavailable();
if (unavailable) console.log(`# QEMU tests skipped: ${unavailable}`);

type Json = Record<string, unknown>;

describe('a QEMU VM', { skip: unavailable ?? false }, () => {
  let vm: SourceVm;
  before(async () => {
    vm = await SourceVm.boot();
  });
  after(() => vm?.cleanup());

  test('a destination whose backend would load other RAM is refused before anything moves; the VM runs on', async () => {
    const rx = await qemuReceiver(vm.destination({}, 'off').line);
    const tx = qemuSender(vm.qmp, rx.port);
    const { code, out } = await tx.done;
    assert.equal(code, 1);
    const error = out['error'] as { code: string; message: string };
    assert.match(error.message, /not shared/);
    assert.equal(out['source_guest'], 'running');
    rx.child.kill();
    const seq = vm.serial.lastSeq;
    await vm.serial.beatsAfter(seq + 5);
    assert.equal((await vmStatus(vm.qmp)).status, 'running');
  });

  test('a lease that runs out resumes the VM, and the commitment is then refused', async () => {
    const source = await QemuSource.attach(vm.qmp);
    try {
      const state = await source.pause({ maxPauseMs: 100 });
      assert.ok(state.length > 10_000, `a device state of ${state.length} bytes`);
      const seq = vm.serial.lastSeq;
      await vm.serial.beatsAfter(seq + 5, 5000); // resumed by the lease, livemig silent
      await assert.rejects(source.commit(), /lease ran out/);
    } finally {
      await source.detach();
    }
    assert.equal((await vmStatus(vm.qmp)).status, 'running');
    // the VM stays here: QEMU's own migration of it later must carry its RAM again
    assert.equal((await vmStatus(vm.qmp)).ignoreShared, false, 'x-ignore-shared is off again');
  });

  test('a VM committed to a destination whose activation then failed runs here again', async () => {
    const source = await QemuSource.attach(vm.qmp);
    try {
      await source.pause({ maxPauseMs: 60_000 });
      await source.commit();
      // the destination said it did not activate (its copy is gone): livemig resumes the source
      await source.resume();
      await vm.serial.beatsAfter(vm.serial.lastSeq + 5);
    } finally {
      await source.detach();
    }
    // (QEMU's monitor takes one client at a time: asked once livemig's connection is gone)
    const status = await vmStatus(vm.qmp);
    assert.deepEqual([status.status, status.ignoreShared], ['running', false], "it runs, QEMU's settings put back");
  });

  test('a throttle moves the vCPU threads into a CPU cgroup of their own, and back', async (t) => {
    const source = await QemuSource.attach(vm.qmp);
    try {
      if (source.throttleRefusal) return t.skip(source.throttleRefusal);
      const qmp = source.qmp;
      const tids = (await qmp.execute<{ 'thread-id': number }[]>('query-cpus-fast')).map((c) => c['thread-id']);
      // each vCPU thread's cpu cgroup (v1: the line naming the cpu controller)
      const vcpus = (): string[] =>
        tids.map((tid) => {
          const lines = readFileSync(`/proc/${vm.child.pid}/task/${tid}/cgroup`, 'utf8').split('\n');
          return lines.map((l) => l.split(':')).find((f) => f[1]?.split(',').includes('cpu'))?.[2] ?? '';
        });
      const before = vcpus();
      assert.ok(before.length > 0, 'QEMU has vCPU threads');
      await source.throttle(75);
      for (const cgroup of vcpus()) assert.match(cgroup, /livemig-qemu-\d+$/, "a vCPU in the throttle's cgroup");
      const seq = vm.serial.lastSeq;
      await vm.serial.beatsAfter(seq + 5); // slowed, not stopped
      await source.throttle(0);
      assert.deepEqual(vcpus(), before, 'every vCPU back where it was');
    } finally {
      await source.detach();
    }
  });

  test('SIGINT in the middle of the copy cancels; the VM runs on', async () => {
    const rx = await qemuReceiver(vm.destination().line);
    const tx = qemuSender(vm.qmp, rx.port, ['--bandwidth', '16']);
    await rx.next('receiving');
    await new Promise((r) => setTimeout(r, 500));
    tx.child.kill('SIGINT');
    const { code, out } = await tx.done;
    assert.equal(code, 1);
    assert.equal((out['error'] as { code: string }).code, 'ERR_LIVEMIG_CANCELLED');
    assert.equal(out['source_guest'], 'running');
    rx.child.kill();
    await vm.serial.beatsAfter(vm.serial.lastSeq + 5);
    assert.equal((await vmStatus(vm.qmp)).status, 'running');
  });

  test('a running VM moves live: its check passes at the destination, where its heartbeats go on', async () => {
    const { out } = await migrateLive(vm);
    assert.equal(out['mode'], 'precopy');
    assert.match(String(out['tracker_reason']), /hash/);
    await new Promise((r) => (vm.child.exitCode !== null ? r(undefined) : vm.child.once('exit', r)));
    assert.equal(vm.running, false, 'the source QEMU quit');
  });
});

describe('a QEMU VM with the preload library', { skip: unavailable ?? false }, () => {
  test("QEMU's writes are tracked exactly, and the VM's check passes at the destination", async () => {
    const vm = await SourceVm.boot({ preload: true });
    try {
      const { out } = await migrateLive(vm);
      assert.equal(out['tracker'], 'uffd-async', String(out['tracker_reason']));
      // the VM ran on while QEMU's migrate set up: that part of the pause is not its downtime
      const sc = out['stop_and_copy'] as { pause_ms: number; ran_after_pause_ms?: number };
      assert.ok(sc.ran_after_pause_ms !== undefined && sc.ran_after_pause_ms > 0 && sc.ran_after_pause_ms <= sc.pause_ms, JSON.stringify(sc));
    } finally {
      vm.cleanup();
    }
  });
});

describe('a QEMU VM by post-copy', { skip: unavailable ?? false }, () => {
  for (const mode of ['postcopy', 'hybrid']) {
    test(`--mode ${mode}: the destination QEMU runs with pages missing, each served at its first touch; the VM's check passes`, async () => {
      const vm = await SourceVm.boot({ preload: true });
      try {
        const { out, received } = await migrateLive(vm, ['--mode', mode, ...(mode === 'hybrid' ? ['--max-rounds', '1'] : [])]);
        assert.equal(out['mode'], mode, JSON.stringify(out));
        const pc = (received['received'] as { postcopy?: { faults?: number } }).postcopy;
        assert.ok(pc, `the destination served post-copy: ${JSON.stringify(received)}`);
      } finally {
        vm.cleanup();
      }
    });
  }
});

describe('a QEMU VM upgraded on its host (--local)', { skip: unavailable ?? false }, () => {
  test("the destination QEMU takes the source's RAM file as it is: only the device state moves, the VM's check passes", async () => {
    const vm = await SourceVm.boot();
    try {
      const { out } = await migrateLive(vm, ['--local']);
      assert.equal(out['local'], true);
      assert.equal(out['pages_sent'], 0, `no page copied: ${JSON.stringify(out)}`);
    } finally {
      vm.cleanup();
    }
  });

  test("a destination that would preallocate the running VM's RAM file is refused; the VM runs on", async () => {
    const vm = await SourceVm.boot();
    try {
      const rx = await qemuReceiver(vm.destination({ ...vm.options, prealloc: true }).line);
      const { code, out } = await qemuSender(vm.qmp, rx.port, ['--local']).done;
      assert.equal(code, 1);
      assert.match((out['error'] as { message: string }).message, /prealloc=on/);
      assert.equal(out['source_guest'], 'running');
      rx.child.kill();
      await vm.serial.beatsAfter(vm.serial.lastSeq + 5);
      assert.equal((await vmStatus(vm.qmp)).status, 'running');
    } finally {
      vm.cleanup();
    }
  });
});

/**
 * Moves `vm` live with receive --qemu-exec / send --qemu; the destination VM's beats go on and
 * its check passes (then it is stopped). Returns send's report.
 */
async function migrateLive(vm: SourceVm, sendArgs: string[] = []): Promise<{ out: Json; received: Json }> {
  const to = vm.destination();
  const rx = await qemuReceiver(to.line);
  const destination = new Serial();
  try {
    const tx = qemuSender(vm.qmp, rx.port, sendArgs);
    await rx.next('receiving');
    // the destination QEMU serves its port from its start: heard from the first beat on
    const heard = destination.attach(to.serial);
    const { code, out } = await tx.done;
    assert.equal(code, 0, JSON.stringify(out));
    const received = await rx.next('received');
    assert.ok(received['guest_pid']);
    await heard;
    await destination.beatsAfter(vm.serial.lastSeq + 5).catch((e: Error) => {
      throw new Error(`${e.message}; the destination said: ${destination.lines.slice(-5).join(' | ')}, last beat ${destination.lastSeq}`);
    });
    assert.deepEqual(await destination.check(), { pages: 16384, bad: 0, firstBad: -1 });
    process.kill(received['guest_pid'] as number, 'SIGKILL');
    return { out, received };
  } finally {
    destination.close();
    rx.child.kill();
  }
}
