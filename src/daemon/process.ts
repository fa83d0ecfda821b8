/**
 * A `livemig serve` daemon as a process of its own (the demo, tests and benchmarks drive
 * daemons as an orchestrator would): started on private sockets, stopped with SIGTERM.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LivemigError } from '../errors.js';

const CLI_ENTRY = fileURLToPath(new URL('../cli/main.js', import.meta.url));

export interface DaemonProcessOptions {
  /** a directory of its own for the sockets, and its history (history.db: start another on the same directory, and it lists this one's migrations) */
  dir: string;
  /** the migration port's address (default 127.0.0.1, any free port) */
  listen?: string;
  /** more `livemig serve` flags */
  args?: readonly string[];
  /** a command prefix (e.g. `ip netns exec NS`) */
  prefix?: readonly string[];
  /** its environment (default this process's) */
  env?: NodeJS.ProcessEnv;
  /** a process group of its own, as a service manager starts a daemon (killGroup then signals all of it) */
  ownGroup?: boolean;
}

export class DaemonProcess {
  readonly child: ChildProcess;
  readonly api: string;
  readonly socketPath: string;
  readonly guests: string;
  readonly port: number;
  /** the daemon's own pid (`livemig serve` may run as a parent that sized the pool, and the daemon) */
  readonly daemonPid: number;
  /** every line it printed after {serving} */
  readonly lines: string[] = [];

  private constructor(o: { child: ChildProcess; socketPath: string; guests: string; port: number; daemonPid: number }) {
    this.child = o.child;
    this.daemonPid = o.daemonPid;
    this.socketPath = o.socketPath;
    this.api = `unix:${o.socketPath}`;
    this.guests = o.guests;
    this.port = o.port;
  }

  static async start(o: DaemonProcessOptions): Promise<DaemonProcess> {
    mkdirSync(o.dir, { recursive: true, mode: 0o700 });
    const api = path.join(o.dir, 'api.sock');
    const guests = path.join(o.dir, 'guests.sock');
    const argv = [
      ...(o.prefix ?? []),
      process.execPath,
      CLI_ENTRY,
      'serve',
      '--api',
      `unix:${api}`,
      '--guests',
      guests,
      '--listen',
      o.listen ?? '127.0.0.1:0',
      ...(o.args ?? []),
    ];
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'], detached: o.ownGroup === true, ...(o.env ? { env: o.env } : {}) });
    const lines = createInterface({ input: child.stdout! });
    const it = lines[Symbol.asyncIterator]();
    const first = await it.next();
    if (first.done) {
      const [code] = (child.exitCode !== null ? [child.exitCode] : await once(child, 'exit')) as [number | null];
      throw new LivemigError('ERR_LIVEMIG_CONNECTION', `livemig serve exited (${String(code)}) before serving`, { phase: 'daemon' });
    }
    const serving = (JSON.parse(first.value) as { serving: { port: number; pid: number } }).serving;
    const d = new DaemonProcess({ child, socketPath: api, guests, port: serving.port, daemonPid: serving.pid });
    lines.on('line', (l) => d.lines.push(l));
    return d;
  }

  /** `signal` to its whole process group (ownGroup), as `timeout` or a service manager's kill does; resolves once it exited. */
  async killGroup(signal: NodeJS.Signals): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = once(this.child, 'exit');
    process.kill(-this.child.pid!, signal);
    await exited;
  }

  /** SIGTERM, then the exit code (the daemon finishes or cancels what runs first). */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.child.exitCode;
    const exited = once(this.child, 'exit') as Promise<[number | null]>;
    this.child.kill(signal);
    return (await exited)[0];
  }
}
