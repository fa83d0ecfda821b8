/**
 * The destination's keeper (src/vmm/qemu/keeper.ts): when livemig dies without a word, it kills
 * the QEMU it was given, and never a process that took that QEMU's pid since.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { until } from './helpers.js';
import { isSameProcess, processRef, processStart } from '../src/process-ref.js';

const KEEPER = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../src/vmm/qemu/keeper.js');

/** a process that starts a keeper for `pid` (with `start`) and exits at once: livemig dying, its pipe closed without `done` */
function keeperOf(pid: number, dir: string, start: string): void {
  const keeper = `new m.DestinationKeeper(${pid}, ${JSON.stringify(dir)}, ${JSON.stringify(start)})`;
  const code = `import(${JSON.stringify(KEEPER)}).then((m) => { ${keeper}; process.exit(0); })`;
  const r = spawnSync(process.execPath, ['-e', code], { stdio: 'inherit' });
  assert.equal(r.status, 0);
}

test("the keeper kills the QEMU it was given, and spares a process whose start time is not that QEMU's", async () => {
  const stranger = spawn('sleep', ['120'], { stdio: 'ignore' });
  const qemu = spawn('sleep', ['120'], { stdio: 'ignore' });
  const strangerRef = processRef(stranger.pid!)!;
  const root = mkdtempSync(path.join(os.tmpdir(), 'livemig-keeper-'));
  const [spared, kept] = [path.join(root, 'spared'), path.join(root, 'kept')];
  for (const d of [spared, kept]) mkdirSync(d);
  try {
    // the same pid with another start time: a process that took a dead QEMU's pid
    keeperOf(stranger.pid!, spared, String(Number(processStart(stranger.pid!)) + 1));
    keeperOf(qemu.pid!, kept, processStart(qemu.pid!)!);
    // each keeper removes its directory once it acted: then its verdict is final
    await until('both keepers acted', () => !existsSync(spared) && !existsSync(kept));
    await until('the QEMU ended', () => qemu.signalCode !== null || qemu.exitCode !== null);
    assert.equal(qemu.signalCode, 'SIGKILL', 'the QEMU livemig started is killed');
    assert.equal(isSameProcess(strangerRef), true, 'the process with its pid and another start time runs on');
  } finally {
    stranger.kill('SIGKILL');
    qemu.kill('SIGKILL');
    rmSync(root, { recursive: true, force: true });
  }
});
