/**
 * livemig's end of a running guest on the source host (docs/GUEST.md): connects to the socket
 * the guest serves, takes its hello and regions (mapped here back to back, one page space), and
 * asks it to pause, commit, resume, throttle and stop. The guest answers on a thread of its own;
 * livemig waits for the answers inside the pause on the calling thread.
 */
import { LivemigError } from '../errors.js';
import { addon, callAsync, closeFd, type ControlMessage } from '../native.js';
import { Region } from '../region/region.js';
import { mappingIsThpEligible } from '../region/huge-pages.js';
import type { SourceDisk } from '../disk/spec.js';
import type { MigrateOptions } from '../source/types.js';
import type { RemoteTarget } from '../tracking/types.js';
import { Tag, parseSourceHello, refused, type SourceHello } from './contract.js';
import { agreeContract, connectWhenListening } from './connect.js';
import type { GuestLayout } from './layout.js';

/** a guest's control thread answers in microseconds; this long means it is gone or stuck */
const CONTROL_TIMEOUT_MS = 2000;
/** a paused guest's lease runs this much past livemig's max pause (whose abort resumes it first) */
const LEASE_SLACK_MS = 1000;

export interface ConnectOptions {
  /** how long to wait for the guest to listen and say hello (default 10 s) */
  timeoutMs?: number;
  /** a process that is the guest: its exit ends the wait at once */
  child?: { exitCode: number | null; signalCode: string | null };
}

export class SourceGuestSession {
  readonly hello: SourceHello;
  /** every region of the guest, mapped here back to back in the hello's order */
  readonly region: Region;
  #fd: number;

  private constructor(hello: SourceHello, region: Region, fd: number) {
    this.hello = hello;
    this.region = region;
    this.#fd = fd;
  }

  /** Connects to the guest at `path` and takes its regions; a hello it refuses changes nothing at the guest. */
  static async connect(path: string, o: ConnectOptions = {}): Promise<SourceGuestSession> {
    const timeoutMs = o.timeoutMs ?? 10_000;
    const fd = await connectWhenListening(path, timeoutMs, o.child);
    return SourceGuestSession.take(fd, timeoutMs, `the guest at ${path}`);
  }

  /**
   * The session on a connection the guest made (it registered with a daemon): the same hello
   * and requests. The descriptor becomes the session's, or is closed on a refusal.
   */
  static async take(fd: number, timeoutMs: number, who: string): Promise<SourceGuestSession> {
    let msg: ControlMessage | undefined;
    try {
      msg = await callAsync('ERR_LIVEMIG_HANDOVER', 'handover', `waiting for the hello of ${who}`, () => addon.controlReceiveAsync(fd, timeoutMs));
      if (msg.tag !== Tag.hello) throw refused(`the guest's first message is 0x${msg.tag.toString(16)}, not its hello ('H')`);
      const hello = parseSourceHello(msg.body, msg.fds);
      await agreeContract(fd, hello, timeoutMs);
      const region = Region.adoptPieces(hello.regions.map((r) => ({ fd: r.fd, offset: r.offset, size: r.size })));
      // THP lives in the guest's mappings, not in its memfds: its smaps says whether they may hold huge pages
      if (hello.regions.every((r) => mappingIsThpEligible(hello.pid, r.address))) region.noteTransparentHugePages();
      return new SourceGuestSession(hello, region, fd);
    } catch (e) {
      // the guest sees its connection close, not paused: it runs on and waits for the next livemig
      closeFd(fd, 'handover');
      for (const f of msg?.fds ?? []) closeFd(f, 'handover');
      throw e;
    }
  }

  get layout(): GuestLayout {
    return this.hello.layout;
  }
  get pid(): number {
    return this.hello.pid;
  }
  /** 'uffd-wp-async' when every region is registered for exact tracking; else livemig hashes */
  get tracking(): 'uffd-wp-async' | 'none' {
    return this.hello.regions.every((r) => r.tracking === 'uffd-wp-async') ? 'uffd-wp-async' : 'none';
  }
  /** where the guest writes its regions, for exact tracking (undefined: it registered none, or not all) */
  get target(): RemoteTarget | undefined {
    if (this.tracking !== 'uffd-wp-async') return undefined;
    const ranges = this.hello.regions.map((r, i) => ({
      address: r.address,
      firstPage: this.layout.regions[i]!.firstPage,
      pages: this.layout.regions[i]!.pages,
    }));
    return { pid: this.pid, address: ranges[0]!.address, ...(ranges.length > 1 ? { ranges } : {}) };
  }

  /** What migrate() needs to know of the guest's memory (the mapping, its regions, how to track it) and of its disks. */
  get memory(): Pick<MigrateOptions, 'region' | 'layout' | 'target' | 'untracked' | 'disks'> {
    const target = this.target;
    return { region: this.region, layout: this.layout, ...(target ? { target } : { untracked: true }), ...(this.disks.length ? { disks: this.disks } : {}) };
  }

  /** The guest's disks (contract 4), as migrate() takes them. */
  get disks(): SourceDisk[] {
    return this.hello.disks.map((d) => ({ name: d.name, size: d.size, fd: d.fd, path: d.path, ...(d.written !== undefined ? { written: d.written } : {}) }));
  }

  /** Pauses the guest; its answer is the device state to carry. `lease`: the guest resumes itself if livemig stays silent this long past it. */
  pause(lease?: { maxPauseMs: number }): Buffer {
    let body: Buffer | undefined;
    if (lease) {
      body = Buffer.alloc(4);
      body.writeUInt32LE(Math.min(0xffffffff, Math.ceil(lease.maxPauseMs + LEASE_SLACK_MS)));
    }
    return this.#request(Tag.pause, Tag.paused, 'stop-and-copy', body);
  }

  /**
   * Right before the point of commitment: the guest must no longer resume by itself. It refuses
   * when its lease already ran out and it resumed (then there must be no commitment). 'C' goes
   * now and its answer is read on the next turn of the loop, so that the guest's round trip runs
   * beside the destination's digest instead of after it, inside the pause.
   */
  commit(): Promise<void> {
    try {
      this.#send(Tag.commit, 'commit');
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise((resolve, reject) =>
      setImmediate(() => {
        try {
          this.#answer(Tag.commit, Tag.committed, 'commit');
          resolve();
        } catch (e) {
          reject(e);
        }
      }),
    );
  }

  resume(): void {
    this.#request(Tag.resume, Tag.resumed, 'resume');
  }

  /** Slows the guest's writes to (100 - percent)% of its rate (auto-converge); 0 releases. */
  throttle(percent: number): void {
    if (!Number.isInteger(percent) || percent < 0 || percent > 99)
      throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `throttle percent must be an integer in 0..99, got ${percent}`, { phase: 'precopy' });
    this.#request(Tag.throttle, Tag.throttled, 'precopy', Buffer.of(percent));
  }

  /** The guest runs at the destination now: it stops for good; livemig's mapping goes. */
  release(): void {
    try {
      this.#request(Tag.release, Tag.released, 'release');
    } finally {
      this.close();
    }
  }

  /** The guest's memory as its files, a memfd and span per region (a same-host upgrade hands them on). */
  get pieces(): { fd: number; offset: number; size: number }[] {
    return this.hello.regions.map((r) => ({ fd: r.fd, offset: r.offset, size: r.size }));
  }

  /** Whether the guest has closed its end (it exited, or let go of a daemon): seen without reading. */
  get gone(): boolean {
    return this.#fd < 0 || addon.unixPeerClosed(this.#fd);
  }

  /** Lets the guest go on without livemig (a failed migration): it resumes itself if it was paused before the commitment. */
  close(): void {
    if (this.#fd >= 0) {
      closeFd(this.#fd, 'guest');
      for (const r of this.hello.regions) closeFd(r.fd, 'guest'); // kept for a same-host upgrade
      for (const d of this.hello.disks) {
        closeFd(d.fd, 'guest');
        if (d.written !== undefined) closeFd(d.written, 'guest');
      }
    }
    this.#fd = -1;
    if (!this.region.released) this.region.release();
  }

  #send(tag: number, phase: string, body?: Buffer): void {
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the guest session is closed', { phase });
    try {
      addon.controlSend(this.#fd, tag, body);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest's control socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
  }

  #answer(request: number, answer: number, phase: string): Buffer {
    if (this.#fd < 0) throw new LivemigError('ERR_LIVEMIG_GUEST', 'the guest session is closed', { phase });
    let r: ControlMessage;
    try {
      r = addon.controlReceive(this.#fd, CONTROL_TIMEOUT_MS);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest's control socket failed: ${(e as Error).message}`, { phase, cause: e });
    }
    for (const f of r.fds) closeFd(f, phase); // none is expected from a source guest
    if (r.tag !== answer) {
      const why = r.body.length ? `: ${r.body.toString('utf8', 0, 300)}` : '';
      throw new LivemigError('ERR_LIVEMIG_GUEST', `the guest answered '${String.fromCharCode(r.tag)}' to '${String.fromCharCode(request)}'${why}`, { phase });
    }
    return r.body;
  }

  #request(request: number, answer: number, phase: string, body?: Buffer): Buffer {
    this.#send(request, phase, body);
    return this.#answer(request, answer, phase);
  }
}
