/**
 * A QEMU VM for the demo, the tests and the benchmarks: the guest contrib/qemu-guest builds (a Debian
 * kernel, busybox and memwriter, which rewrites a checkable region of guest RAM and beats on
 * ttyS1), its RAM on a shared file, QMP on a unix socket. What the VM says on ttyS1 is read as
 * one byte stream across a migration: a stop can fall in the middle of a line, the rest then
 * comes from the destination's port.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { preloadEnv } from '../vmm/qemu/preload.js';
import { QmpClient } from '../vmm/qemu/qmp.js';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const QEMU = process.env['LIVEMIG_QEMU'] ?? 'qemu-system-x86_64';

/** Why QEMU VMs cannot run here (undefined: they can): no QEMU, or the guest does not build. */
export function qemuUnavailable(): string | undefined {
  try {
    execFileSync(QEMU, ['--version'], { stdio: 'ignore' });
  } catch {
    return `${QEMU} is not installed (Debian: apt-get install qemu-system-x86)`;
  }
  try {
    guestImage();
  } catch (e) {
    return `the test guest does not build: ${(e as Error).message.split('\n').slice(-3).join(' ')}`;
  }
  return undefined;
}

let built: { kernel: string; initrd: string } | undefined;
/** The kernel and initramfs (contrib/qemu-guest/build.sh, cached outside the repository). */
export function guestImage(): { kernel: string; initrd: string } {
  if (built) return built;
  const out = execFileSync(path.join(REPO, 'contrib/qemu-guest/build.sh'), { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const files = out.trim().split('\n');
  const kernel = files.find((f) => f.endsWith('/vmlinuz'));
  const initrd = files.find((f) => f.endsWith('/initramfs.cpio.gz'));
  if (!kernel || !initrd) throw new Error(`build.sh printed no kernel and initramfs: ${out}`);
  built = { kernel, initrd };
  return built;
}

export interface VmOptions {
  memMiB?: number;
  /** memwriter: the checked region (MiB) and its rewrite rate (MiB/s) */
  writeMiB?: number;
  rate?: number;
  hbMs?: number;
  /** load livemig's preload library into QEMU: its writes to RAM are tracked exactly */
  preload?: boolean;
  /** the memory backend's prealloc=on: QEMU maps (and touches) all its RAM at start */
  prealloc?: boolean;
  /**
   * a virtio disk (/dev/vda, the drive's id `vda`) memwriter writes checkable blocks to: its
   * first `mib` MiB at `rate` MiB/s; the image at `path` in `format` (default raw)
   */
  disk?: { path: string; mib: number; rate: number; format?: string };
  /** another QEMU (default LIVEMIG_QEMU, else qemu-system-x86_64), and arguments it needs (e.g. -L for an unpacked one) */
  binary?: { path: string; args: string[] };
}

/** the test VM's disk: its -drive id, the name livemig moves it by */
export const DISK_ID = 'vda';

/** QEMU's arguments for the test VM, its memory backend's mem-path as given. */
export function vmArgs(dir: string, name: string, memPath: string, o: VmOptions = {}, share = 'on'): string[] {
  const { kernel, initrd } = guestImage();
  const mem = o.memMiB ?? 256;
  return [
    ...(o.binary?.args ?? []),
    ...['-accel', 'tcg', '-m', `${mem}M`, '-smp', '1', '-display', 'none', '-no-user-config', '-monitor', 'none', '-nic', 'none', '-vga', 'none'],
    ...['-kernel', kernel, '-initrd', initrd],
    '-append',
    `console=ttyS0 quiet memwriter.mib=${o.writeMiB ?? 64} memwriter.rate=${o.rate ?? 16} memwriter.hb_ms=${o.hbMs ?? 5}` +
      (o.disk ? ` memwriter.disk_mib=${o.disk.mib} memwriter.disk_rate=${o.disk.rate}` : ''),
    ...['-serial', `file:${path.join(dir, `console-${name}.log`)}`, '-serial', `unix:${path.join(dir, `hb-${name}.sock`)},server=on,wait=off`],
    ...['-object', `memory-backend-file,id=ram0,size=${mem}M,mem-path=${memPath},share=${share}${o.prealloc ? ',prealloc=on' : ''}`],
    ...['-machine', 'pc,suppress-vmdesc=on,memory-backend=ram0'],
    ...(o.disk ? ['-drive', `file=${o.disk.path},format=${o.disk.format ?? 'raw'},if=virtio,id=${DISK_ID}`] : []),
  ];
}

/** A shell line of words, each quoted. */
export function shellLine(words: readonly string[]): string {
  return words.map((w) => (/^[\w@%+=:,./{}-]+$/.test(w) ? w : `'${w.replaceAll("'", "'\\''")}'`)).join(' ');
}

/** ttyS1 of a VM (source, then destination): heartbeats and the answers to commands. */
export class Serial {
  #text = '';
  #socket: Socket | undefined;
  /** the last heartbeat's sequence number, and when (host clock, ms) each arrived */
  lastSeq = -1;
  /** the disk blocks memwriter wrote so far (the last heartbeat's count) */
  diskWrites = 0;
  beats: { seq: number; at: number }[] = [];

  /** Reads the port at `sockPath` from now on (after a migration: the destination's). */
  async attach(sockPath: string, timeoutMs = 30_000): Promise<void> {
    this.#socket?.destroy();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        this.#socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect(sockPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    this.#socket.setEncoding('utf8');
    this.#socket.on('data', (s: string) => this.#data(s));
    this.#socket.on('error', () => undefined); // the VM went: what it said is kept
  }

  #data(s: string): void {
    this.#text += s;
    for (let nl = this.#text.indexOf('\n'); nl >= 0; nl = this.#text.indexOf('\n')) {
      const line = this.#text.slice(0, nl);
      this.#text = this.#text.slice(nl + 1);
      const hb = /^HB (\d+) \d+(?: (\d+))?/.exec(line);
      if (hb) {
        this.lastSeq = Number(hb[1]);
        if (hb[2] !== undefined) this.diskWrites = Number(hb[2]);
        this.beats.push({ seq: this.lastSeq, at: performance.now() });
        if (this.beats.length > 100_000) this.beats.splice(0, 50_000);
      } else {
        this.lines.push(line);
      }
    }
  }

  /** lines other than heartbeats */
  lines: string[] = [];

  /** Waits for a line starting with `prefix` (after those seen so far). */
  async waitLine(prefix: string, timeoutMs = 30_000): Promise<string> {
    const from = this.lines.length;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.lines.slice(from).find((l) => l.startsWith(prefix));
      if (hit) return hit;
      if (Date.now() > deadline) throw new Error(`no "${prefix}" line within ${timeoutMs} ms (last: ${this.lines.slice(-3).join(' | ')})`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Waits until heartbeats past `seq` arrive: the VM runs. */
  async beatsAfter(seq: number, timeoutMs = 10_000): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    while (this.lastSeq <= seq) {
      if (Date.now() > deadline)
        throw new Error(
          `no heartbeat after ${seq} within ${timeoutMs} ms (the last: ${this.lastSeq}; other lines: ${this.lines.slice(-3).join(' | ') || 'none'})`,
        );
      await new Promise((r) => setTimeout(r, 10));
    }
    return this.lastSeq;
  }

  /** memwriter checks every page it wrote: { pages, bad } */
  async check(): Promise<{ pages: number; bad: number; firstBad: number }> {
    const answer = this.waitLine('CHECK ', 30_000);
    this.#socket!.write('CHECK\n');
    const m = /^CHECK ok pages=(\d+) bad=(\d+) first_bad=(-?\d+)/.exec(await answer);
    if (!m) throw new Error(`memwriter answered ${await answer}`);
    return { pages: Number(m[1]), bad: Number(m[2]), firstBad: Number(m[3]) };
  }

  /** memwriter reads its disk back and checks every block against what it wrote */
  async dcheck(): Promise<{ blocks: number; written: number; bad: number; firstBad: number; errors: number }> {
    const answer = this.waitLine('DCHECK ', 120_000);
    this.#socket!.write('DCHECK\n');
    const m = /^DCHECK ok blocks=(\d+) written=(\d+) bad=(\d+) first_bad=(-?\d+) errors=(\d+)/.exec(await answer);
    if (!m) throw new Error(`memwriter answered ${await answer}`);
    return { blocks: Number(m[1]), written: Number(m[2]), bad: Number(m[3]), firstBad: Number(m[4]), errors: Number(m[5]) };
  }

  close(): void {
    this.#socket?.destroy();
  }
}

/** A source VM, booted: its RAM in /dev/shm, QMP at `qmp`, memwriter ready on `serial`. */
export class SourceVm {
  readonly dir: string;
  readonly qmp: string;
  readonly ram: string;
  readonly child: ChildProcess;
  readonly serial = new Serial();

  readonly options: VmOptions;

  private constructor(dir: string, ram: string, child: ChildProcess, options: VmOptions) {
    this.dir = dir;
    this.ram = ram;
    this.qmp = path.join(dir, 'qmp-src.sock');
    this.child = child;
    this.options = options;
  }

  static async boot(o: VmOptions = {}): Promise<SourceVm> {
    const dir = mkdtempSync(path.join(tmpdir(), 'livemig-qemu-test-'));
    const ram = `/dev/shm/${path.basename(dir)}-src`;
    const child = spawn(o.binary?.path ?? QEMU, [...vmArgs(dir, 'src', ram, o), '-qmp', `unix:${path.join(dir, 'qmp-src.sock')},server=on,wait=off`], {
      stdio: ['ignore', 'ignore', 'inherit'],
      env: { ...process.env, ...(o.preload ? preloadEnv([ram]) : {}) },
    });
    const vm = new SourceVm(dir, ram, child, o);
    try {
      await vm.serial.attach(path.join(dir, 'hb-src.sock'));
      await vm.serial.waitLine('READY', 120_000);
      await vm.serial.beatsAfter(vm.serial.lastSeq);
      return vm;
    } catch (e) {
      vm.stop();
      throw e;
    }
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  #destinations = 0;
  /**
   * The line for `receive --qemu-exec`: the same VM, its RAM at {memory}, and where its ttyS1
   * is served (each destination a port of its own).
   */
  destination(o: VmOptions = this.options, share = 'on'): { line: string; serial: string } {
    const name = `dst${++this.#destinations}`;
    // its disk where livemig creates the image
    const placed = o.disk ? { ...o, disk: { ...o.disk, path: `{disk:${DISK_ID}}`, format: 'raw' } } : o;
    return { line: shellLine([o.binary?.path ?? QEMU, ...vmArgs(this.dir, name, '{memory}', placed, share)]), serial: path.join(this.dir, `hb-${name}.sock`) };
  }

  /**
   * A destination QEMU of the source's own kind, started here with `extra` (QEMU's own
   * migration: -incoming): its QMP, ttyS1 and RAM file.
   */
  startDestination(extra: string[]): { child: ChildProcess; qmp: string; serial: string; ram: string } {
    const name = `dst${++this.#destinations}`;
    const ram = `${this.ram.replace(/-src$/, '')}-${name}`;
    const qmp = path.join(this.dir, `qmp-${name}.sock`);
    const args = [...vmArgs(this.dir, name, ram, this.options), '-qmp', `unix:${qmp},server=on,wait=off`, ...extra];
    const child = spawn(this.options.binary?.path ?? QEMU, args, { stdio: ['ignore', 'ignore', 'inherit'] });
    this.#extra.push({ child, ram });
    return { child, qmp, serial: path.join(this.dir, `hb-${name}.sock`), ram };
  }

  readonly #extra: { child: ChildProcess; ram: string }[] = [];

  stop(): void {
    this.serial.close();
    this.child.kill('SIGKILL');
    rmSync(this.ram, { force: true });
    for (const e of this.#extra.splice(0)) {
      e.child.kill('SIGKILL');
      rmSync(e.ram, { force: true });
    }
  }

  cleanup(): void {
    this.stop();
    if (existsSync(this.dir)) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** What a VM's QEMU says of it: its run state, and whether its migration leaves shared RAM out (x-ignore-shared, livemig's setting). */
export async function vmStatus(qmpPath: string): Promise<{ status: string; ignoreShared: boolean }> {
  const qmp = await QmpClient.connect(qmpPath);
  try {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    const caps = await qmp.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
    return { status, ignoreShared: caps.find((c) => c.capability === 'x-ignore-shared')?.state === true };
  } finally {
    qmp.close();
  }
}
