/**
 * A QMP client (QEMU's machine protocol: JSON objects, one per line, on a unix socket). One
 * command at a time is in flight, as QMP answers in order; events come between answers and
 * go to whoever waits for them. Every answer is QEMU's word, checked before use: an error
 * carries QEMU's own description.
 */
import { Socket } from 'node:net';
import { LivemigError } from '../../errors.js';
import { addon, closeFd } from '../../native.js';

/** an answer or event bigger than this is not QMP talking */
const MAX_LINE = 16 << 20;
const DEFAULT_TIMEOUT_MS = 10_000;

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export class QmpClient {
  readonly #socket: Socket;
  readonly #who: string;
  #buffer = '';
  #pending: Pending[] = [];
  #listeners = new Set<(e: QmpEvent) => void>();
  #closed: Error | undefined;
  /** QEMU's version from the greeting, e.g. { major: 10, minor: 0, micro: 2 } */
  version = { major: 0, minor: 0, micro: 0 };

  /** QEMU's process */
  readonly pid: number;
  /** the connection's descriptor (a keeper inherits it: keeper.ts) */
  readonly fd: number;

  private constructor(socket: Socket, who: string, pid: number, fd: number) {
    this.#socket = socket;
    this.fd = fd;
    this.#who = who;
    this.pid = pid;
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.#data(chunk));
    socket.on('error', (e) => this.#fail(new LivemigError('ERR_LIVEMIG_QEMU', `${who}: ${e.message}`, { phase: 'qemu', cause: e })));
    socket.on('close', () => this.#fail(new LivemigError('ERR_LIVEMIG_QEMU', `${who}: the QMP connection closed (QEMU exited?)`, { phase: 'qemu' })));
  }

  /** Connects, takes the greeting and enters command mode (qmp_capabilities). */
  static async connect(path: string, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<QmpClient> {
    const who = `QEMU's QMP at ${path}`;
    let fd: number;
    try {
      fd = addon.unixConnect(path);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_QEMU', `${who}: ${(e as Error).message} (is QEMU running with -qmp unix:${path},server=on,wait=off?)`, {
        phase: 'qemu',
        cause: e,
      });
    }
    // the kernel's word for which process QEMU is: its memory and its threads are looked at there
    let pid: number;
    try {
      pid = addon.unixPeerPid(fd);
    } catch (e) {
      closeFd(fd, 'qemu');
      throw e;
    }
    const socket = new Socket({ fd, readable: true, writable: true });
    const qmp = new QmpClient(socket, who, pid, fd);
    try {
      const greeting = (await qmp.#expect('greeting', timeoutMs)) as { QMP?: { version?: { qemu?: { major: number; minor: number; micro: number } } } };
      const v = greeting.QMP?.version?.qemu;
      if (!greeting.QMP || !v || typeof v.major !== 'number') throw new LivemigError('ERR_LIVEMIG_QEMU', `${who}: no QMP greeting`, { phase: 'qemu' });
      qmp.version = { major: v.major, minor: v.minor, micro: v.micro };
      await qmp.execute('qmp_capabilities', undefined, timeoutMs);
      return qmp;
    } catch (e) {
      qmp.close();
      throw e;
    }
  }

  /** Runs a command; resolves with its `return`, rejects with QEMU's error description. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<T> {
    if (this.#closed) return Promise.reject(this.#closed);
    const line = JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n';
    const answer = this.#expect(command, timeoutMs);
    this.#socket.write(line);
    return answer as Promise<T>;
  }

  /** Subscribes to events; returns the unsubscribe function. */
  onEvent(l: (e: QmpEvent) => void): () => void {
    this.#listeners.add(l);
    return () => this.#listeners.delete(l);
  }

  /**
   * The first event named `name` (and matching `accept`) from now on; rejects when `fail`
   * matches one first (its reason), after `timeoutMs`, or when the connection goes.
   */
  waitEvent(name: string, o: { accept?: (e: QmpEvent) => boolean; fail?: (e: QmpEvent) => string | undefined; timeoutMs?: number } = {}): Promise<QmpEvent> {
    if (this.#closed) return Promise.reject(this.#closed);
    return new Promise((resolve, reject) => {
      const done = (): void => {
        off();
        clearTimeout(timer);
        this.#waiters.delete(onClose);
      };
      const onClose = (e: Error): void => (done(), reject(e));
      const off = this.onEvent((e) => {
        const why = o.fail?.(e);
        if (why !== undefined) {
          done();
          reject(new LivemigError('ERR_LIVEMIG_QEMU', `${this.#who}: ${why}`, { phase: 'qemu' }));
        } else if (e.event === name && (!o.accept || o.accept(e))) {
          done();
          resolve(e);
        }
      });
      const ms = o.timeoutMs ?? DEFAULT_TIMEOUT_MS;
      const timer = setTimeout(
        () => (done(), reject(new LivemigError('ERR_LIVEMIG_TIMEOUT', `${this.#who}: no ${name} event within ${ms} ms`, { phase: 'qemu' }))),
        ms,
      );
      this.#waiters.add(onClose);
    });
  }

  readonly #waiters = new Set<(e: Error) => void>();

  get closed(): boolean {
    return this.#closed !== undefined;
  }

  close(): void {
    this.#socket.destroy();
    this.#fail(new LivemigError('ERR_LIVEMIG_QEMU', `${this.#who}: closed`, { phase: 'qemu' }));
  }

  #expect(command: string, timeoutMs: number): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const p: Pending = {
        command,
        resolve,
        reject,
        timer: setTimeout(() => {
          // QMP answers in order: one answer lost leaves every later one off by one
          this.#fail(new LivemigError('ERR_LIVEMIG_TIMEOUT', `${this.#who}: no answer to ${command} within ${timeoutMs} ms`, { phase: 'qemu' }));
          this.#socket.destroy();
        }, timeoutMs),
      };
      this.#pending.push(p);
    });
  }

  #data(chunk: string): void {
    this.#buffer += chunk;
    if (this.#buffer.length > MAX_LINE && !this.#buffer.includes('\n')) {
      this.#fail(new LivemigError('ERR_LIVEMIG_QEMU', `${this.#who}: a line longer than ${MAX_LINE} bytes`, { phase: 'qemu' }));
      this.#socket.destroy();
      return;
    }
    for (let nl = this.#buffer.indexOf('\n'); nl >= 0; nl = this.#buffer.indexOf('\n')) {
      const line = this.#buffer.slice(0, nl).trim();
      this.#buffer = this.#buffer.slice(nl + 1);
      if (line) this.#line(line);
    }
  }

  #line(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line) as Record<string, unknown>;
      if (typeof m !== 'object' || m === null || Array.isArray(m)) throw new Error('not an object');
    } catch (e) {
      this.#fail(new LivemigError('ERR_LIVEMIG_QEMU', `${this.#who}: not QMP: ${line.slice(0, 120)}`, { phase: 'qemu', cause: e }));
      this.#socket.destroy();
      return;
    }
    if (typeof m['event'] === 'string') {
      for (const l of [...this.#listeners]) l(m as unknown as QmpEvent);
      return;
    }
    const p = this.#pending.shift();
    if (!p) return; // an answer nobody asked for: QMP never sends one
    clearTimeout(p.timer);
    if ('QMP' in m) return p.resolve(m); // the greeting
    if ('return' in m) return p.resolve(m['return']);
    const err = m['error'] as { class?: string; desc?: string } | undefined;
    p.reject(new LivemigError('ERR_LIVEMIG_QEMU', `QEMU refused ${p.command}: ${err?.desc ?? JSON.stringify(m).slice(0, 200)}`, { phase: 'qemu' }));
  }

  #fail(e: Error): void {
    if (this.#closed) return;
    this.#closed = e;
    for (const p of this.#pending.splice(0)) {
      clearTimeout(p.timer);
      p.reject(e);
    }
    for (const w of [...this.#waiters]) w(e);
  }
}
