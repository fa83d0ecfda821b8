/**
 * The fault matrix's QEMU cells (issue 34; the matrix itself: test/faults.test.ts): a livemig
 * process SIGKILLed at an exact step (test/fixtures/fault-hook.ts) while it moves a real QEMU
 * VM. Afterwards exactly one VM runs, and its memory checks out by the guest's own check (every
 * page memwriter wrote): on the source when the fault came before the commitment, on the
 * destination after it. A QEMU has no lease of its own: the keepers (src/vmm/qemu/keeper.ts)
 * stand in for the process that died. Post-copy × SIGKILL of the receiver is the row where no VM
 * can run afterwards (as in the matrix): the pages not yet moved were only in flight.
 */
import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { qemuReceiver, qemuSender, type SpawnWith } from '../src/demo/qemu-demo.js';
import { Serial, SourceVm, qemuUnavailable, vmStatus } from '../src/demo/qemu-vm.js';
import { STEP, type Side, type Stage } from './fixtures/fault-steps.js';

const unavailable = qemuUnavailable();
if (unavailable) console.log(`# QEMU fault cells skipped: ${unavailable}`);

const HOOK = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures', 'fault-hook.js');
const ALL_PAGES = { pages: 16384, bad: 0, firstBad: -1 };

/** where the hook marks each fault (fault-hook.ts) */
const scratch = mkdtempSync(path.join(tmpdir(), 'livemig-qemu-faults-'));
process.on('exit', () => rmSync(scratch, { recursive: true, force: true }));

/** `node --import` of the fault hook: SIGKILL at `stage`'s step on `side` */
function killAt(stage: Stage, side: Side): SpawnWith {
  const mark = path.join(scratch, `${stage}-${side}`.replaceAll(' ', '-'));
  return {
    nodeArgs: ['--import', HOOK],
    env: { ...process.env, LIVEMIG_FAULT: JSON.stringify({ ...STEP[stage][side], fault: 'kill', dev: '', port: 0, mark }) },
  };
}

/** how `child` ended: the signal that ended it (null: it exited) */
async function signalOf(child: ChildProcess): Promise<NodeJS.Signals | null> {
  if (child.exitCode === null && child.signalCode === null) await new Promise((r) => child.once('exit', r));
  return child.signalCode;
}

/** QEMU processes whose command line names `needle` (a VM's own socket directory) */
function qemusWith(needle: string): number[] {
  const pids: number[] = [];
  for (const p of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8');
      if (cmd.startsWith('qemu-system') || cmd.includes('/qemu-system')) if (cmd.includes(needle)) pids.push(Number(p));
    } catch {
      // gone while listed
    }
  }
  return pids;
}

/** waits until no process of `pids` is left (a bound passed is a failure) */
async function gone(pids: number[], what: string): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (pids.some((p) => readdirSync('/proc').includes(String(p)))) {
    if (Date.now() > deadline) assert.fail(`${what} still there: ${pids}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The source VM runs on: it beats, QEMU says running with its settings back, and its memory checks out. */
async function sourceRunsOn(vm: SourceVm): Promise<void> {
  await vm.serial.beatsAfter(vm.serial.lastSeq + 5, 60_000);
  const said = await vmStatus(vm.qmp);
  assert.equal(said.status, 'running');
  assert.equal(said.ignoreShared, false, "QEMU's x-ignore-shared is off again");
  assert.deepEqual(await vm.serial.check(), ALL_PAGES);
}

describe('QEMU cells of the fault matrix', { skip: unavailable ?? false }, () => {
  let vm: SourceVm;
  before(async () => {
    vm = await SourceVm.boot();
  });
  after(() => vm?.cleanup());

  test('receiver SIGKILLed in the first round: the source VM runs on, intact; the destination QEMU goes with the receiver', async () => {
    const to = vm.destination();
    const rx = await qemuReceiver(to.line, killAt('first round', 'destination'));
    const tx = qemuSender(vm.qmp, rx.port);
    const { code, out } = await tx.done;
    assert.equal(code, 1, JSON.stringify(out));
    assert.match(String((out['error'] as { code?: string })?.code), /^ERR_LIVEMIG_/);
    assert.equal(out['source_guest'], 'running');
    assert.equal(await signalOf(rx.child), 'SIGKILL', 'the fault hit the receiver');
    await gone(
      qemusWith(path.dirname(to.serial)).filter((p) => p !== vm.child.pid),
      'the destination QEMU',
    );
    await sourceRunsOn(vm);
  });

  test('send SIGKILLed in the pause, the VM stopped and not committed: its keeper resumes it, intact', async () => {
    const to = vm.destination();
    const rx = await qemuReceiver(to.line);
    const tx = qemuSender(vm.qmp, rx.port, [], killAt('pause', 'source'));
    await tx.done;
    assert.equal(await signalOf(tx.child), 'SIGKILL', 'the fault hit send');
    const received = await rx.next('error').catch(() => rx.next('received'));
    assert.ok(received['error'], `the destination did not take the VM: ${JSON.stringify(received)}`);
    await gone(
      qemusWith(path.dirname(to.serial)).filter((p) => p !== vm.child.pid),
      'the destination QEMU',
    );
    await sourceRunsOn(vm);
  });

  test('receiver SIGKILLed once the VM runs at the destination: it runs on there, intact; the source VM stays stopped', async () => {
    const to = vm.destination();
    const rx = await qemuReceiver(to.line, killAt('after COMMIT', 'destination'));
    const destination = new Serial();
    try {
      const tx = qemuSender(vm.qmp, rx.port);
      await rx.next('receiving');
      const heard = destination.attach(to.serial);
      const { out } = await tx.done;
      assert.equal(await signalOf(rx.child), 'SIGKILL', `the fault hit the receiver (send said ${JSON.stringify(out)}; receive ${JSON.stringify(rx.lines)})`);
      await heard;
      await destination.beatsAfter(vm.serial.lastSeq + 5, 60_000);
      assert.deepEqual(await destination.check(), ALL_PAGES);
      const source = vm.child.exitCode === null ? (await vmStatus(vm.qmp)).status : 'quit';
      assert.notEqual(source, 'running', 'one VM runs: the source does not');
      const [pid] = qemusWith(path.dirname(to.serial)).filter((p) => p !== vm.child.pid);
      if (pid) process.kill(pid, 'SIGKILL');
    } finally {
      destination.close();
    }
  });
});

describe('the QEMU post-copy cell of the fault matrix', { skip: unavailable ?? false }, () => {
  let vm: SourceVm;
  before(async () => {
    vm = await SourceVm.boot();
  });
  after(() => vm?.cleanup());

  test('receiver SIGKILLed in post-copy: no VM runs (its missing pages died with the receiver), and both sides say so', async () => {
    const to = vm.destination();
    const rx = await qemuReceiver(to.line, killAt('post-copy', 'destination'));
    const { code, out } = await qemuSender(vm.qmp, rx.port, ['--mode', 'postcopy', '--recover-timeout', '5']).done;
    assert.equal(await signalOf(rx.child), 'SIGKILL', `the fault hit the receiver (send said ${JSON.stringify(out)}; receive ${JSON.stringify(rx.lines)})`);
    assert.equal(code, 1, JSON.stringify(out));
    assert.match(JSON.stringify(out['error']), /"phase":"(postcopy|activate)"/, 'the loss names its stage');
    assert.notEqual(out['source_guest'], 'running', 'the source never runs its copy once post-copy began');
    await gone(
      qemusWith(path.dirname(to.serial)).filter((p) => p !== vm.child.pid),
      'the destination QEMU (its keeper stops it)',
    );
    const source = vm.child.exitCode === null ? (await vmStatus(vm.qmp)).status : 'quit';
    assert.notEqual(source, 'running');
  });
});
