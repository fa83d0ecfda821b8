/**
 * QEMU's own migration stream, reduced to device state: with x-ignore-shared on both sides and
 * the RAM on a shared file, what QEMU sends is its devices, ROMs and small RAM blocks (about
 * 0.2-0.5 MB for a small VM). The source saves it with the VM stopped, the destination loads it
 * before the VM runs; both through a unix socket in a private directory (no descriptor passing,
 * which QMP would need for `fd:`), each waited on by QEMU's MIGRATION event, not by polling
 * (a poll contends for QEMU's lock).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { LivemigError } from '../../errors.js';
import type { QmpClient, QmpEvent } from './qmp.js';

/** a device state bigger than this is not a small VM's devices: something large travels in QEMU's stream */
export const MAX_DEVICE_STATE = 256 << 20;

const failed = (e: QmpEvent): string | undefined =>
  e.event === 'MIGRATION' && (e.data?.['status'] === 'failed' || e.data?.['status'] === 'cancelled')
    ? `QEMU's migration ${String(e.data['status'])}`
    : undefined;

/**
 * Both sides: QEMU leaves shared RAM to livemig, and says when its stream is done. At the
 * source, a downtime limit QEMU's small remainder always fits: `migrate` then stops the VM
 * itself at once, inside its own migration thread (cheaper than `stop` and a `migrate` after it).
 */
export interface MigrationSettings {
  /** puts back what the VM's QEMU had */
  restore(): Promise<void>;
  /** the same as QMP command lines, for a keeper that puts them back when livemig is gone (keeper.ts) */
  readonly restoreLines: string[];
}

export async function prepareMigration(qmp: QmpClient, side: 'source' | 'destination'): Promise<MigrationSettings> {
  // what the source VM's QEMU had, put back when the VM stays there: x-ignore-shared left on
  // would make QEMU's own migration of it, later, leave its RAM behind
  const caps = await qmp.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
  const params = await qmp.execute<{ 'downtime-limit'?: number }>('query-migrate-parameters');
  const had = (name: string): boolean => caps.find((c) => c.capability === name)?.state === true;
  const commands: [string, Record<string, unknown>][] = [
    [
      'migrate-set-capabilities',
      {
        capabilities: [
          { capability: 'x-ignore-shared', state: had('x-ignore-shared') },
          { capability: 'events', state: had('events') },
        ],
      },
    ],
  ];
  if (side === 'source' && params['downtime-limit'] !== undefined) commands.push(['migrate-set-parameters', { 'downtime-limit': params['downtime-limit'] }]);
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'x-ignore-shared', state: true },
      { capability: 'events', state: true },
    ],
  });
  if (side === 'source') await qmp.execute('migrate-set-parameters', { 'downtime-limit': 60_000 });
  return {
    restore: async () => {
      for (const [command, args] of commands) await qmp.execute(command, args);
    },
    restoreLines: commands.map(([command, args]) => JSON.stringify({ execute: command, arguments: args })),
  };
}

async function errorText(qmp: QmpClient, why: string): Promise<string> {
  const q = await qmp.execute<{ 'error-desc'?: string }>('query-migrate').catch(() => undefined);
  return q?.['error-desc'] ? `${why}: ${q['error-desc']}` : why;
}

/**
 * The VM's device state (QEMU's stream with x-ignore-shared): QEMU stops the VM (if it runs)
 * and streams its devices; the VM stays stopped ('postmigrate').
 */
export async function saveDeviceState(qmp: QmpClient, timeoutMs: number): Promise<Buffer> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-qemu-'));
  const sock = path.join(dir, 'state');
  const server = createServer();
  try {
    const chunks: Buffer[] = [];
    let bytes = 0;
    const received = new Promise<void>((resolve, reject) => {
      server.once('connection', (c: Socket) => {
        server.close();
        c.on('data', (b: Buffer) => {
          bytes += b.length;
          if (bytes > MAX_DEVICE_STATE)
            return c.destroy(new LivemigError('ERR_LIVEMIG_QEMU', `QEMU's stream passed ${MAX_DEVICE_STATE} bytes: is its RAM shared?`, { phase: 'qemu' }));
          chunks.push(b);
        });
        c.once('end', resolve);
        c.once('error', reject);
      });
    });
    received.catch(() => undefined);
    await new Promise<void>((resolve, reject) => server.listen(sock, resolve).once('error', reject));
    const completed = qmp.waitEvent('MIGRATION', { accept: (e) => e.data?.['status'] === 'completed', fail: failed, timeoutMs });
    completed.catch(() => undefined);
    await qmp.execute('migrate', { uri: `unix:${sock}` });
    try {
      await Promise.all([completed, received]);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_QEMU', await errorText(qmp, `saving the device state: ${(e as Error).message}`), {
        phase: 'stop-and-copy',
        cause: e,
      });
    }
    return Buffer.concat(chunks, bytes);
  } finally {
    server.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The destination's way in for the device state: QEMU (started with `-incoming defer`) listens
 * from now on, and livemig is connected, so that inside the pause the state only has to be
 * written (QEMU's setup of an incoming migration took milliseconds there).
 */
export async function openIncoming(qmp: QmpClient, inside: string): Promise<IncomingState> {
  // in the destination QEMU's own directory: what a receiver killed leaves, its keeper removes
  const sock = path.join(inside, 'state');
  try {
    await qmp.execute('migrate-incoming', { uri: `unix:${sock}` });
    const socket = await new Promise<Socket>((resolve, reject) => {
      const c = createConnection(sock);
      c.once('connect', () => resolve(c));
      c.once('error', reject);
    });
    socket.on('error', () => undefined); // a QEMU that fails says why on QMP and its stderr
    return new IncomingState(qmp, socket, sock);
  } catch (e) {
    rmSync(sock, { force: true });
    throw e;
  }
}

export class IncomingState {
  readonly #qmp: QmpClient;
  readonly #socket: Socket;
  /** the socket's path, in the destination QEMU's directory */
  readonly #path: string;

  constructor(qmp: QmpClient, socket: Socket, socketPath: string) {
    this.#qmp = qmp;
    this.#socket = socket;
    this.#path = socketPath;
  }

  /** Loads a device state; the VM stays paused (-S). */
  async load(state: Buffer, timeoutMs: number): Promise<void> {
    try {
      const completed = this.#qmp.waitEvent('MIGRATION', { accept: (e) => e.data?.['status'] === 'completed', fail: failed, timeoutMs });
      completed.catch(() => undefined);
      const sent = new Promise<void>((resolve, reject) => {
        this.#socket.once('error', reject);
        this.#socket.end(state, () => resolve());
      });
      await Promise.all([sent, completed]);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_QEMU', await errorText(this.#qmp, `loading the device state: ${(e as Error).message}`), {
        phase: 'activate',
        cause: e,
      });
    } finally {
      this.close();
    }
  }

  close(): void {
    this.#socket.destroy();
    rmSync(this.#path, { force: true });
  }
}
