/**
 * Keepers: what a QEMU needs done when the livemig process driving it dies without a word
 * (SIGKILL, a crash, the OOM killer). A contract guest holds its own lease; a QEMU waits on QMP
 * for ever. So each side leaves a tiny shell beside its QEMU, told on a pipe where the migration
 * stands, that acts only when the pipe closes with no `done`:
 * - the source's keeper holds a copy of livemig's QMP connection; if the VM was paused by livemig
 *   and not committed, it runs again (`cont`); livemig's migration settings are put back either
 *   way, so QEMU's own migration later carries the RAM again. A committed VM stays paused: the
 *   destination may run it.
 * - the destination's keeper kills a QEMU that was never told to run (and removes the receiver's
 *   directory of its sockets): nothing else would stop a QEMU waiting in `-incoming`. Told `running` before `cont`, it lets the VM be; after a switch
 *   to post-copy only once every page is here (a VM running on pages that only the dead
 *   receiver could fetch must stop, not read zeros).
 * A shell, not a Node process: it must cost nothing beside every QEMU, and outlive livemig.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Writable } from 'node:stream';
import { processStart } from '../../process-ref.js';

export type SourceKeeperState = 'attached' | 'paused' | 'committed';

/*
 * On the pipe's end without `done`: the commands in LIVEMIG_QEMU_RESTORE, after a `cont` when
 * paused. `cont` goes twice: a `migrate` still in flight when livemig died fails (its socket
 * went with livemig) and QEMU resumes the VM itself, but it refuses a `cont` until then. The
 * connection stays open a moment after, so QEMU reads the commands before it sees the close.
 */
const SOURCE_SCRIPT = `state=attached
while IFS= read -r line; do
  case "$line" in done) exit 0 ;; *) state=$line ;; esac
done
[ "$state" = committed ] && exit 0
[ "$state" = paused ] && printf '%s\\n' '{"execute":"cont"}' >&3
printf '%s\\n' "$LIVEMIG_QEMU_RESTORE" >&3
sleep 1
[ "$state" = paused ] && printf '%s\\n' '{"execute":"cont"}' >&3
sleep 1
`;

const DESTINATION_SCRIPT = `while IFS= read -r line; do
  case "$line" in done|running) exit 0 ;; esac
done
# only the QEMU started then: a QEMU that died left its pid free for another process
if [ "$LIVEMIG_QEMU_PID" -gt 1 ] && read -r stat < "/proc/$LIVEMIG_QEMU_PID/stat" 2>/dev/null; then
  set -- \${stat##*) }
  shift 19
  [ "$1" = "$LIVEMIG_QEMU_START" ] && kill -9 "$LIVEMIG_QEMU_PID" 2>/dev/null
fi
[ -n "$LIVEMIG_QEMU_DIR" ] && rm -rf -- "$LIVEMIG_QEMU_DIR"
`;

class Keeper {
  readonly #child: ChildProcess;
  readonly #pipe: Writable;
  #ended = false;

  constructor(script: string, env: Record<string, string>, inherit: number | 'ignore') {
    this.#child = spawn('/bin/sh', ['-c', script], {
      stdio: ['pipe', 'ignore', 'ignore', inherit],
      detached: true, // a terminal's SIGINT to livemig's group is livemig's to handle, not the keeper's
      env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', ...env },
    });
    this.#child.on('error', (e) => process.stderr.write(`livemig: the QEMU keeper did not start: ${e.message}\n`));
    this.#pipe = this.#child.stdin!;
    this.#pipe.on('error', () => undefined); // a keeper gone is a keeper that can do nothing more: livemig itself goes on
    this.#child.unref();
    (this.#pipe as unknown as { unref?: () => void }).unref?.();
  }

  protected say(line: string): void {
    if (!this.#ended) this.#pipe.write(`${line}\n`);
  }

  /** livemig ends normally: the keeper goes without acting. */
  done(): void {
    if (this.#ended) return;
    this.say('done');
    this.#ended = true;
    this.#pipe.end();
  }
}

export class SourceKeeper extends Keeper {
  /** `qmpFd`: livemig's QMP connection; `restoreLines`: the commands that put QEMU's settings back */
  constructor(qmpFd: number, restoreLines: readonly string[]) {
    super(SOURCE_SCRIPT, { LIVEMIG_QEMU_RESTORE: restoreLines.join('\n') }, qmpFd);
  }

  /** where the migration stands: a VM `paused` by livemig is resumed if livemig dies; a `committed` one is not */
  set(state: SourceKeeperState): void {
    this.say(state);
  }
}

export class DestinationKeeper extends Keeper {
  /**
   * `dir`: the receiver's directory for this QEMU (its sockets), removed with it; `start`: the
   * QEMU's start time (field 22 of /proc/PID/stat): the keeper kills that process or none
   */
  constructor(qemuPid: number, dir: string, start: string = processStart(qemuPid, 'qemu') ?? '') {
    super(DESTINATION_SCRIPT, { LIVEMIG_QEMU_PID: String(qemuPid), LIVEMIG_QEMU_START: start, LIVEMIG_QEMU_DIR: dir }, 'ignore');
  }

  /** said just before `cont`: a VM that may run here is never killed by the keeper */
  running(): void {
    this.say('running');
  }
}
