/**
 * Post-copy into a destination QEMU: livemig serves the VM's first touch of each page while it
 * runs, as for a contract guest, through the preload library loaded into the QEMU it started
 * (native/qemu/preload.c). A thread of the library answers the contract's post-copy requests on
 * a socket pair: REGISTER (QEMU's mapping of its RAM registered for minor faults; the
 * userfaultfd and the mapping's address come back) and ALL_PRESENT (every page is here: QEMU's
 * writes are tracked again, for the VM's next migration).
 */
import { existsSync } from 'node:fs';
import { LivemigError } from '../../errors.js';
import { Tag } from '../../guest/contract.js';
import { addon, closeFd, type ControlMessage } from '../../native.js';
import type { PostcopyRegistration } from '../../receiver/types.js';
import { QEMU_PRELOAD } from './preload.js';

/** the descriptor QEMU inherits its end as */
export const CONTROL_FD = 4;
const ANSWER_TIMEOUT_MS = 10_000;

/** Why post-copy into QEMU cannot be offered here (undefined: it can). */
export function postcopyRefusal(): string | undefined {
  return existsSync(QEMU_PRELOAD) ? undefined : `the preload library is not built (${QEMU_PRELOAD}: npm install builds it)`;
}

export class PreloadControl {
  #fd: number;
  /** QEMU's end, handed to it at its start and closed here then */
  #theirs: number;

  constructor() {
    [this.#fd, this.#theirs] = addon.socketPair(false);
  }

  /** the environment that loads the library into QEMU and names its RAM file and this socket */
  env(memoryPath: string): Record<string, string> {
    const others = process.env['LD_PRELOAD'];
    return {
      LD_PRELOAD: others ? `${QEMU_PRELOAD} ${others}` : QEMU_PRELOAD,
      LIVEMIG_QEMU_RAM: memoryPath,
      LIVEMIG_QEMU_CONTROL_FD: String(CONTROL_FD),
    };
  }

  get theirs(): number {
    return this.#theirs;
  }

  /** QEMU has its end (or never will): this process's copy goes */
  handedOver(): void {
    if (this.#theirs >= 0) closeFd(this.#theirs, 'qemu');
    this.#theirs = -1;
  }

  /** QEMU's RAM registered for minor faults; livemig's copy of the userfaultfd and where QEMU maps the RAM. */
  register(): PostcopyRegistration {
    const r = this.#request(Tag.register, Tag.registered);
    if (r.fds.length !== 1 || r.body.length !== 12 || r.body.readUInt32LE(0) !== 1) {
      for (const f of r.fds) closeFd(f, 'postcopy');
      throw new LivemigError('ERR_LIVEMIG_QEMU', `the destination QEMU's registration is malformed (${r.fds.length} descriptors, ${r.body.length} bytes)`, {
        phase: 'postcopy',
      });
    }
    return { uffd: r.fds[0]!, address: r.body.readBigUInt64LE(4) };
  }

  /** Post-copy is over: QEMU's writes are tracked again (a failure only costs the next migration its exact tracking). */
  allPresent(): string | undefined {
    try {
      this.#request(Tag.allPresent, Tag.allPresentAck);
      return undefined;
    } catch (e) {
      return (e as Error).message;
    }
  }

  close(): void {
    this.handedOver();
    if (this.#fd >= 0) closeFd(this.#fd, 'qemu');
    this.#fd = -1;
  }

  #request(request: number, answer: number): ControlMessage {
    const what = `'${String.fromCharCode(request)}' to the destination QEMU's preload library`;
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_QEMU', `${what}: the socket is closed`, { phase: 'postcopy' });
    let r: ControlMessage;
    try {
      r = addon.controlRequest(this.#fd, request, ANSWER_TIMEOUT_MS);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_QEMU', `${what}: ${(e as Error).message}`, { phase: 'postcopy', cause: e });
    }
    if (r.tag === answer) return r;
    for (const f of r.fds) closeFd(f, 'postcopy');
    const said = r.tag === Tag.error ? `refused: ${r.body.toString('utf8', 0, 300)}` : `answered '${String.fromCharCode(r.tag)}'`;
    throw new LivemigError('ERR_LIVEMIG_QEMU', `${what}: ${said}`, { phase: 'postcopy' });
  }
}
