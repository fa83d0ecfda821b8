/**
 * A QEMU VM registered with the daemon by its QMP socket (POST /v1/guests, docs/API.md). The
 * daemon does not hold the VM between migrations: QEMU's QMP socket serves one client at a
 * time, and the operator's tools need it too. Registration takes the VM exactly as `livemig send
 * --qemu` does (QemuSource.attach: running, one memory backend on a shared named file, QEMU's
 * mapping of it found), notes what it found and lets go (QEMU's migration settings as they
 * were); each migration takes it again. The VM is the same process throughout: its pid and that
 * process's start time are checked, so a QEMU that quit, or another one serving the same path
 * later, is never moved under the registered name.
 */
import { lstatSync } from 'node:fs';
import path from 'node:path';
import { LivemigError } from '../errors.js';
import { QemuSource } from '../vmm/qemu/source.js';
import { isSameProcess, processRef, type ProcessRef } from '../process-ref.js';

/** the QMP client's words for a first line that is not QEMU's greeting (they quote the line) */
const NOT_A_GREETING = /^QEMU refused greeting: |: not QMP: |: no QMP greeting$/;

/** sun_path holds 108 bytes, the last a NUL */
const MAX_SOCKET_PATH = 107;

export interface QemuFacts {
  pid: number;
  bytes: number;
  /** the memory backend's id (QEMU matches RAM by it at the destination) and its file */
  memdev: string;
  ramPath: string;
  /** QEMU's RAM writes tracked exactly (the preload library), else hashed; and why */
  exact: boolean;
  trackingReason: string;
}

export class QemuGuest {
  readonly qmp: string;
  readonly facts: QemuFacts;
  /** the QEMU process by pid and start time: a pid reused by another process differs */
  readonly #process: ProcessRef;

  private constructor(qmp: string, facts: QemuFacts, process: ProcessRef) {
    this.qmp = qmp;
    this.facts = facts;
    this.#process = process;
  }

  /** Takes the VM at `qmp` once, to check it and learn what it is, and lets it go: refused as `send --qemu` refuses it. */
  static async probe(qmp: string): Promise<QemuGuest> {
    checkQmpPath(qmp);
    const vm = await QemuSource.attach(qmp).catch((e: unknown) => {
      // what another kind of socket said first is not the API caller's to read
      if (e instanceof LivemigError && NOT_A_GREETING.test(e.message))
        throw new LivemigError('ERR_LIVEMIG_QEMU', `${qmp} is not a QMP socket: what it sent first is not QEMU's greeting`, { phase: 'validate' });
      throw e;
    });
    let facts: QemuFacts;
    try {
      facts = {
        pid: vm.pid,
        bytes: vm.ram.size,
        memdev: vm.ram.id,
        ramPath: vm.ram.path,
        exact: vm.tracking.exact,
        trackingReason: vm.tracking.reason,
      };
    } finally {
      await vm.detach();
    }
    const started = processRef(facts.pid);
    if (started === undefined)
      throw new LivemigError('ERR_LIVEMIG_QEMU', `QEMU (pid ${facts.pid}) at ${qmp} exited while it was being registered`, { phase: 'validate' });
    return new QemuGuest(qmp, facts, started);
  }

  /** Whether the registered QEMU process still runs. */
  get gone(): boolean {
    return !isSameProcess(this.#process);
  }

  /** Takes the VM for a migration: refused unless it is the QEMU registered, with the RAM it had. */
  async attach(): Promise<QemuSource> {
    if (this.gone) throw new LivemigError('ERR_LIVEMIG_QEMU', `the registered QEMU (pid ${this.facts.pid}) is gone`, { phase: 'qemu' });
    const vm = await QemuSource.attach(this.qmp);
    const changed =
      vm.pid !== this.facts.pid
        ? `${this.qmp} is served by pid ${vm.pid} now, not by the QEMU registered (pid ${this.facts.pid})`
        : vm.ram.size !== this.facts.bytes || vm.ram.id !== this.facts.memdev
          ? `its memory backend is ${vm.ram.id} of ${vm.ram.size} bytes now, registered as ${this.facts.memdev} of ${this.facts.bytes}`
          : undefined;
    if (changed === undefined) return vm;
    await vm.detach();
    throw new LivemigError('ERR_LIVEMIG_QEMU', `${changed}: unregister it and register it again`, { phase: 'qemu' });
  }
}

/**
 * The QMP path an API caller gave: absolute, in its plain form (no `..`, no `//`), short enough
 * for a unix socket, and a socket itself (not a symlink to one: the path registered is the one
 * connected to). Connecting sends nothing before QEMU's greeting, so another kind of socket
 * hears nothing from the daemon.
 */
export function checkQmpPath(qmp: string): void {
  const bad = (why: string, code: 'ERR_LIVEMIG_INVALID_ARGUMENT' | 'ERR_LIVEMIG_QEMU' = 'ERR_LIVEMIG_INVALID_ARGUMENT'): LivemigError =>
    new LivemigError(code, `qemu.qmp ${JSON.stringify(qmp).slice(0, 200)}: ${why}`, { phase: 'validate' });
  if (!path.isAbsolute(qmp) || path.posix.normalize(qmp) !== qmp || qmp.endsWith('/')) throw bad('must be an absolute path in its plain form');
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f]/.test(qmp)) throw bad('holds control characters');
  if (Buffer.byteLength(qmp) > MAX_SOCKET_PATH) throw bad(`is longer than a unix socket path can be (${MAX_SOCKET_PATH} bytes)`);
  let isSocket: boolean;
  try {
    isSocket = lstatSync(qmp).isSocket();
  } catch (e) {
    throw bad(`${(e as NodeJS.ErrnoException).code ?? (e as Error).message} (is QEMU running with -qmp unix:${qmp},server=on,wait=off?)`, 'ERR_LIVEMIG_QEMU');
  }
  if (!isSocket) throw bad('is not a unix socket (a symlink is not followed)');
}
