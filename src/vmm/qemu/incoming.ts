/**
 * The destination QEMU: started from the operator's command line with the RAM livemig receives
 * as its memory backend (`{memory}` in the command becomes a path to livemig's memfd, handed to
 * QEMU as a descriptor), waiting (`-incoming defer -S`) until livemig loads the device state;
 * checked before anything loads: a backend that is not that memfd, or not shared, would load
 * "successfully" with RAM that is not the guest's.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LivemigError } from '../../errors.js';
import { checkIncomingDisks, placeDisks, placedDisks } from './disks.js';
import { SHARED_FILE_HINT } from './memory.js';
import { openIncoming, prepareMigration, type IncomingState } from './device-state.js';
import { DestinationKeeper } from './keeper.js';
import { PreloadControl, postcopyRefusal } from './postcopy.js';
import { QmpClient } from './qmp.js';
import type { PostcopyRegistration } from '../../receiver/types.js';

export const MEMORY_PLACEHOLDER = '{memory}';
/** the descriptor QEMU inherits the memory as */
const MEMORY_FD = 3;
const START_TIMEOUT_MS = 30_000;
const LOAD_TIMEOUT_MS = 30_000;
/** what is kept of QEMU's stderr, for its own words when it fails */
const STDERR_KEPT = 4096;

export interface IncomingQemuStart {
  /** QEMU's command line, as words; one of them holds MEMORY_PLACEHOLDER (its memory backend's mem-path) */
  command: readonly string[];
  /** the memory: livemig's memfd, and the region's size and name (the source's memory backend id) */
  memory: { fd: number; size: number; id: string };
  /** a same-host upgrade: the memory is the source QEMU's own RAM file, in use by the running VM until the pause */
  local?: boolean;
  /** load the preload library (post-copy, and exact tracking of the VM's writes for its next migration); default: when it is built */
  preload?: boolean;
  /** the source's disks and livemig's image of each, put where the command says {disk:NAME} */
  disks?: readonly { name: string; path: string }[];
  /** where QEMU's stdout goes: this process's stderr by default (its stdout may be a stream of JSON lines), or nowhere */
  stdout?: 'stderr' | 'ignore';
}

/** Refuses a command QEMU cannot be started from for an incoming migration. */
export function checkQemuCommand(command: readonly string[]): void {
  if (command.length === 0) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', 'the QEMU command is empty', { phase: 'validate' });
  if (!command.some((w) => w.includes(MEMORY_PLACEHOLDER)))
    throw new LivemigError(
      'ERR_LIVEMIG_INVALID_ARGUMENT',
      `the QEMU command must name its RAM file with ${MEMORY_PLACEHOLDER}, as in ${SHARED_FILE_HINT.replace('/dev/shm/NAME', MEMORY_PLACEHOLDER)}`,
      {
        phase: 'validate',
      },
    );
  placedDisks(command);
  for (const flag of ['-incoming', '-qmp'])
    if (command.some((w) => new RegExp(`(^|\\s)-?${flag}(\\s|=|$)`).test(w)))
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `the QEMU command must not have ${flag}: livemig adds its own`, { phase: 'validate' });
}

export class IncomingQemu {
  readonly child: ChildProcess;
  readonly qmp: QmpClient;
  readonly #dir: string;
  readonly #stderr: () => string;

  readonly #incoming: IncomingState;
  /** kills this QEMU if the receiver dies before the VM was told to run */
  readonly #keeper: DestinationKeeper;
  /** the preload library's post-copy service inside QEMU (undefined: not loaded) */
  readonly #control: PreloadControl | undefined;

  private constructor(
    child: ChildProcess,
    qmp: QmpClient,
    dir: string,
    stderr: () => string,
    incoming: IncomingState,
    keeper: DestinationKeeper,
    control: PreloadControl | undefined,
  ) {
    this.child = child;
    this.#keeper = keeper;
    this.#control = control;
    this.qmp = qmp;
    this.#dir = dir;
    this.#stderr = stderr;
    this.#incoming = incoming;
  }

  get pid(): number {
    return this.child.pid ?? 0;
  }

  static async start(o: IncomingQemuStart): Promise<IncomingQemu> {
    checkQemuCommand(o.command);
    // refused before QEMU starts: a prealloc runs at its start, over the file the source VM still writes
    if (o.local === true && o.command.some((w) => /\bprealloc=(on|yes|true)\b/.test(w))) throw preallocRefusal();
    for (const w of o.command) placeDisks(w, o.disks ?? []); // a disk it cannot place is refused before anything is made
    const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-qemu-in-'));
    const qmpPath = path.join(dir, 'qmp');
    const memoryPath = `/proc/self/fd/${MEMORY_FD}`;
    const args = [
      ...o.command.slice(1).map((w) => placeDisks(w.replaceAll(MEMORY_PLACEHOLDER, memoryPath), o.disks ?? [])),
      '-qmp',
      `unix:${qmpPath},server=on,wait=off`,
      '-incoming',
      'defer',
      '-S',
    ];
    const control = (o.preload ?? postcopyRefusal() === undefined) ? new PreloadControl() : undefined;
    const child = spawn(o.command[0]!, args, {
      stdio: ['ignore', o.stdout === 'ignore' ? 'ignore' : 2, 'pipe', o.memory.fd, ...(control ? [control.theirs] : [])],
      env: { ...process.env, ...control?.env(memoryPath) },
    });
    control?.handedOver();
    const keeper = new DestinationKeeper(child.pid ?? 0, dir);
    let stderr = '';
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (s: string) => {
      process.stderr.write(s);
      stderr = (stderr + s).slice(-STDERR_KEPT);
    });
    const words = (): string => (stderr.trim() ? `: ${stderr.trim()}` : '');
    let qmp: QmpClient | undefined;
    try {
      qmp = await connectWhenUp(child, qmpPath, words);
      await checkMemory(qmp, memoryPath, o.memory, o.local === true);
      await checkIncomingDisks(qmp, o.disks ?? []);
      await prepareMigration(qmp, 'destination');
      const incoming = await openIncoming(qmp, dir);
      return new IncomingQemu(child, qmp, dir, () => stderr, incoming, keeper, control);
    } catch (e) {
      qmp?.close();
      control?.close();
      child.kill('SIGKILL');
      keeper.done();
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
  }

  /**
   * Loads the device state (the VM stays paused), once: called when the state arrives, before
   * the source commits, so a state QEMU refuses fails the migration with the source's VM still
   * there. QEMU's own words when it refuses. With pages still missing (post-copy) the load
   * waits for activate(): QEMU reads guest RAM as it loads (virtio rings), and only the fault
   * service, running by then, can give it those pages.
   */
  prepare(state: Buffer, o: { pagesMissing?: boolean } = {}): Promise<void> {
    if (o.pagesMissing) {
      this.#pagesMissing = true;
      return Promise.resolve();
    }
    this.#loaded ??= this.#incoming.load(state, LOAD_TIMEOUT_MS).catch((e: unknown) => {
      const said = this.#stderr().trim();
      throw new LivemigError('ERR_LIVEMIG_QEMU', `${(e as Error).message}${said ? `; QEMU said: ${said.slice(-600)}` : ''}`, { phase: 'activate', cause: e });
    });
    return this.#loaded;
  }

  #loaded: Promise<void> | undefined;
  #running = false;
  /** post-copy: the VM runs on pages that exist only at the source until every page is here */
  #pagesMissing = false;

  /** told to run (`cont` answered) */
  get running(): boolean {
    return this.#running;
  }

  /** Why post-copy into this QEMU cannot be (undefined: it can). */
  get postcopyRefusal(): string | undefined {
    return this.#control ? undefined : (postcopyRefusal() ?? 'the destination QEMU was started without the preload library');
  }

  /** Post-copy: QEMU's RAM mapping registered for minor faults, before the VM loads and runs. */
  register(): PostcopyRegistration {
    if (!this.#control) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `post-copy into QEMU: ${this.postcopyRefusal}`, { phase: 'postcopy' });
    return this.#control.register();
  }

  /** Post-copy is over (livemig closed its userfaultfd): QEMU's writes are tracked again; why not, if not. */
  allPresent(): string | undefined {
    this.#keeper.running(); // from now on the VM holds all it needs: it outlives the receiver
    return this.#control?.allPresent();
  }

  /** The VM runs here. */
  async activate(state: Buffer): Promise<void> {
    await this.prepare(state);
    // said first: if the receiver dies from here on, the VM may be running, and is never killed
    // for it; unless pages are missing, which only the receiver could give it (then it must stop)
    if (!this.#pagesMissing) this.#keeper.running();
    await this.qmp.execute('cont');
    this.#running = true;
    this.qmp.close(); // the VM is the operator's now; livemig's QMP connection goes
    this.child.unref();
    rmSync(this.#dir, { recursive: true, force: true });
  }

  kill(): void {
    this.#control?.close();
    this.#incoming.close();
    this.qmp.close();
    this.child.kill('SIGKILL');
    this.#keeper.done();
    rmSync(this.#dir, { recursive: true, force: true });
  }

  /** livemig is done: a VM told to run runs on; one that was not is stopped. */
  close(): void {
    if (!this.#running) this.kill();
    else this.#control?.close(); // the library's thread ends; the VM runs on
  }
}

async function connectWhenUp(child: ChildProcess, qmpPath: string, words: () => string): Promise<QmpClient> {
  const deadline = performance.now() + START_TIMEOUT_MS;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new LivemigError('ERR_LIVEMIG_QEMU', `the destination QEMU exited (${child.exitCode ?? child.signalCode}) before it served QMP${words()}`, {
        phase: 'reserve',
      });
    if (existsSync(qmpPath)) {
      try {
        return await QmpClient.connect(qmpPath);
      } catch (e) {
        if (performance.now() > deadline) throw e;
      }
    }
    if (performance.now() > deadline)
      throw new LivemigError('ERR_LIVEMIG_TIMEOUT', `the destination QEMU served no QMP within ${START_TIMEOUT_MS} ms${words()}`, { phase: 'reserve' });
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The destination's backend must be livemig's memfd, shared, of the source's size and id. */
async function checkMemory(qmp: QmpClient, memoryPath: string, memory: { size: number; id: string }, local: boolean): Promise<void> {
  const refuse = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_QEMU', `the destination QEMU: ${why}`, { phase: 'reserve' });
  const memdevs = await qmp.execute<{ id: string; size: number; share: boolean }[]>('query-memdev');
  if (!Array.isArray(memdevs) || memdevs.length !== 1)
    throw refuse(`${Array.isArray(memdevs) ? memdevs.length : 'no'} memory backends, not the one the source has`);
  const m = memdevs[0]!;
  if (m.id !== memory.id) throw refuse(`its memory backend is ${m.id}, the source's ${memory.id}: QEMU matches RAM by that name`);
  if (m.size !== memory.size) throw refuse(`its memory backend holds ${m.size} bytes, the source's ${memory.size}`);
  if (m.share !== true) throw refuse(`its memory backend is not shared (share=off): it would load with RAM that is not the guest's; use ${SHARED_FILE_HINT}`);
  const got = await qmp.execute('qom-get', { path: `/objects/${m.id}`, property: 'mem-path' }).catch((e: Error) => {
    throw refuse(`its memory backend is not a file (${e.message}): it would load with RAM that is not the guest's`);
  });
  if (got !== memoryPath) throw refuse(`its memory backend's mem-path is ${JSON.stringify(got)}, not livemig's memory (${MEMORY_PLACEHOLDER})`);
  // prealloc touches every page of the file while the source VM still writes it: QEMU without
  // MADV_POPULATE_WRITE reads a byte and writes it back, which can undo the guest's write between
  if (local && (await qmp.execute('qom-get', { path: `/objects/${m.id}`, property: 'prealloc' })) === true) throw preallocRefusal();
}

function preallocRefusal(): LivemigError {
  return new LivemigError(
    'ERR_LIVEMIG_QEMU',
    "the destination QEMU: its memory backend has prealloc=on: in a same-host upgrade the RAM file is the running source VM's, " +
      'which preallocation would touch (drop prealloc=on)',
    { phase: 'reserve' },
  );
}
