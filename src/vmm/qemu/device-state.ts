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

/** Both sides: QEMU leaves shared RAM to livemig, and says when its stream is done. */
export async function prepareMigration(qmp: QmpClient): Promise<void> {
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'x-ignore-shared', state: true },
      { capability: 'events', state: true },
    ],
  });
}

async function errorText(qmp: QmpClient, why: string): Promise<string> {
  const q = await qmp.execute<{ 'error-desc'?: string }>('query-migrate').catch(() => undefined);
  return q?.['error-desc'] ? `${why}: ${q['error-desc']}` : why;
}

/** The stopped VM's device state (QEMU's stream with x-ignore-shared). */
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

/** Loads a device state into a QEMU started with `-incoming defer` (it stays paused: -S). */
export async function loadDeviceState(qmp: QmpClient, state: Buffer, timeoutMs: number): Promise<void> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-qemu-'));
  const sock = path.join(dir, 'state');
  try {
    const completed = qmp.waitEvent('MIGRATION', { accept: (e) => e.data?.['status'] === 'completed', fail: failed, timeoutMs });
    completed.catch(() => undefined);
    await qmp.execute('migrate-incoming', { uri: `unix:${sock}` });
    const sent = new Promise<void>((resolve, reject) => {
      const c = createConnection(sock);
      c.once('error', reject);
      c.end(state, () => resolve());
    });
    try {
      await Promise.all([sent, completed]);
    } catch (e) {
      throw new LivemigError('ERR_LIVEMIG_QEMU', await errorText(qmp, `loading the device state: ${(e as Error).message}`), { phase: 'activate', cause: e });
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
