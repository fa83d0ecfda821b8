/** Daemons, registered guests and API calls for the daemon's tests. */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach } from 'node:test';
import { request, type ApiTarget } from '../src/daemon/client.js';
import { referenceGuestRegisterArgs, type GuestDiskOptions } from '../src/workload/controller.js';
import { processRef, signalProcess, type ProcessRef } from '../src/process-ref.js';

export interface RegisteredGuest {
  name: string;
  child: ChildProcess;
  pid: number;
}

/** A reference guest that registers with the daemon at `guests` as `name`; resolves once the daemon lists it. */
export async function registerGuest(
  api: ApiTarget,
  guests: string,
  name: string,
  o: { size: number; rate?: number; heartbeat?: string; seed?: bigint; beatMs?: number; diskImage?: GuestDiskOptions },
): Promise<RegisteredGuest> {
  const argv = referenceGuestRegisterArgs(guests, name, {
    size: o.size,
    content: 'mixed',
    rate: o.rate ?? 32,
    pattern: 'uniform',
    ...(o.heartbeat ? { heartbeat: o.heartbeat } : {}),
    ...(o.seed !== undefined ? { seed: o.seed } : {}),
    // no daemon test measures a guest's gaps: 15-30 guests ticking every millisecond took a CPU
    beatMs: o.beatMs ?? 10,
    ...(o.diskImage ? { diskImage: o.diskImage } : {}),
  });
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'ignore', 'inherit'] });
  for (let i = 0; ; i++) {
    const { body } = await request<{ guests: { name: string }[] }>(api, 'GET', '/v1/guests');
    if (body.guests.some((g) => g.name === name)) break;
    if (child.exitCode !== null) throw new Error(`guest ${name} exited (${child.exitCode}) before registering`);
    if (i > 2400) throw new Error(`guest ${name} did not register within 120 s`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { name, child, pid: child.pid! };
}

/** Raw HTTP: status and parsed body, errors included (the tests look at refusals). */
export async function call(api: ApiTarget, method: string, route: string, body?: unknown): Promise<{ status: number; body: Record<string, unknown> }> {
  try {
    return await request(api, method, route, body);
  } catch (e) {
    const err = e as { code?: string; message: string; httpStatus?: number; body?: Record<string, unknown> };
    if (err.httpStatus === undefined) throw e;
    return { status: err.httpStatus, body: err.body ?? {} };
  }
}

/** Polls the migration until it ends; its final view. */
export async function settled(api: ApiTarget, id: string, timeoutMs = 180_000): Promise<Record<string, unknown>> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const { body } = await request(api, 'GET', `/v1/migrations/${id}`);
    if (['completed', 'failed', 'cancelled'].includes(String(body['state']))) return body;
    if (Date.now() > until) throw new Error(`migration ${id} did not end within ${timeoutMs} ms: ${JSON.stringify(body).slice(0, 400)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Polls migrations until every one has ended; their final views. However long a loaded host
 * takes, they are waited for while they move: only `stallMs` without any of them changing
 * (state, stage, progress) fails the wait.
 */
export async function allSettled(list: { api: ApiTarget; id: string }[], stallMs = 120_000): Promise<Record<string, unknown>[]> {
  let seen = '';
  let changed = performance.now();
  for (;;) {
    const views = await Promise.all(list.map(async (m) => (await request<Record<string, unknown>>(m.api, 'GET', `/v1/migrations/${m.id}`)).body));
    if (views.every((v) => ['completed', 'failed', 'cancelled'].includes(String(v['state'])))) return views;
    const now = JSON.stringify(views.map((v) => [v['state'], v['stage'], v['progress']]));
    if (now !== seen) [seen, changed] = [now, performance.now()];
    if (performance.now() - changed > stallMs) throw new Error(`no migration moved for ${stallMs} ms: ${now.slice(0, 400)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Guests a test started or saw started, killed when it ends. Each is remembered with its start
 * time: a guest that exited by itself left its pid free, and the suite, running beside the fault
 * matrix, had a later process (a stopped `send`) take that pid and die of the kill.
 */
export class Pids {
  readonly #refs: ProcessRef[] = [];

  push(...pids: number[]): void {
    for (const pid of pids) {
      const ref = processRef(pid);
      if (ref) this.#refs.push(ref);
    }
  }

  /** SIGKILL to each remembered process that still holds its pid; forgets them all. */
  killAll(): void {
    for (const ref of this.#refs.splice(0)) signalProcess(ref, 'SIGKILL');
  }
}

/**
 * A test file's scratch: directories under the temp dir (removed when the file ends) and the
 * pids of guests its tests start or see started (killed after each test: a guest left beating
 * through later tests makes the whole suite's host busier).
 */
export function scratch(prefix: string): { tmp(tag: string): string; pids: Pids } {
  const dirs: string[] = [];
  const pids = new Pids();
  afterEach(() => pids.killAll());
  after(() => {
    pids.killAll();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });
  return {
    pids,
    tmp(tag: string): string {
      const d = mkdtempSync(path.join(os.tmpdir(), `${prefix}-${tag}-`));
      dirs.push(d);
      return d;
    },
  };
}

/** The daemon's /metrics, as Prometheus text, through its API socket (with its token, when the target has one). */
export async function metricsText(api: ApiTarget): Promise<string> {
  const http = await import('node:http');
  const token = (api as { token?: string }).token;
  return new Promise<string>((resolve, reject) => {
    http
      .get({ socketPath: (api as { socketPath: string }).socketPath, path: '/metrics', headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (text += d));
        res.on('end', () => resolve(text));
      })
      .on('error', reject);
  });
}
