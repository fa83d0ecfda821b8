/**
 * The CLI's end of the daemon's API (docs/API.md): requests over the unix socket or TCP with
 * Node's HTTP client, the bearer token from --token-file, and Server-Sent Events read with
 * eventsource-parser.
 */
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { createParser } from 'eventsource-parser';
import { LivemigError, type ErrorCode } from '../errors.js';
import { usageError, type FlagValues, type Flags } from './flags.js';
import { parseHostPort } from './units.js';

/** Where a daemon's sockets are by default: /run/livemig as root, a private directory otherwise. */
export function defaultDaemonDir(): string {
  return process.getuid?.() === 0 ? '/run/livemig' : path.join(os.tmpdir(), `livemig-${process.getuid?.() ?? 'user'}`);
}

export const DEFAULT_API = (): string => `unix:${path.join(defaultDaemonDir(), 'api.sock')}`;

export const CLIENT_FLAGS: Flags = {
  api: { type: 'string', value: 'unix:PATH|HOST:PORT', help: `the daemon's API (default ${DEFAULT_API()})` },
  'token-file': { type: 'string', value: 'FILE', help: "the API's bearer token (required when the API is on TCP)" },
  json: { type: 'boolean', default: false, help: 'print JSON (one object per line) instead of text' },
};

export type ApiTarget = { socketPath: string; token?: string } | { host: string; port: number; token?: string };

export function parseApiAddress(text: string, flag = '--api'): { path: string } | { host: string; port: number } {
  if (text.startsWith('unix:')) {
    const p = text.slice(5);
    if (p.length === 0 || p.length > 107) throw usageError(`${flag}: a unix socket path is 1..107 characters, got '${p}'`);
    return { path: p };
  }
  return parseHostPort(text, flag);
}

export function readToken(file: string): string {
  let t: string;
  try {
    t = readFileSync(file, 'utf8').trim();
  } catch (e) {
    throw usageError(`--token-file: cannot read ${file}: ${(e as Error).message}`);
  }
  if (t.length < 16 || /\s/.test(t)) throw usageError(`--token-file: ${file} must hold one token of at least 16 characters without spaces`);
  return t;
}

export function targetFrom(v: FlagValues): ApiTarget {
  const a = parseApiAddress(typeof v['api'] === 'string' ? v['api'] : DEFAULT_API());
  const token = typeof v['token-file'] === 'string' ? readToken(v['token-file']) : undefined;
  const base = 'path' in a ? { socketPath: a.path } : { host: a.host, port: a.port };
  return token ? { ...base, token } : base;
}

function options(t: ApiTarget, method: string, route: string, headers: Record<string, string>): http.RequestOptions {
  return {
    method,
    path: route,
    ...('socketPath' in t ? { socketPath: t.socketPath } : { host: t.host, port: t.port }),
    headers: { ...headers, ...(t.token ? { authorization: `Bearer ${t.token}` } : {}) },
  };
}

function describe(t: ApiTarget): string {
  return 'socketPath' in t ? `unix:${t.socketPath}` : `${t.host}:${t.port}`;
}

/** One JSON request; an error answer becomes a LivemigError with the daemon's code. */
export function request<T = Record<string, unknown>>(t: ApiTarget, method: string, route: string, body?: unknown): Promise<{ status: number; body: T }> {
  const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = http.request(options(t, method, route, data ? { 'content-type': 'application/json', 'content-length': String(data.length) } : {}), (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed: unknown;
        try {
          parsed = text.length ? JSON.parse(text) : {};
        } catch {
          parsed = { text };
        }
        const status = res.statusCode ?? 0;
        if (status >= 400) {
          const e = (parsed as { error?: { code?: string; message?: string; phase?: string } }).error;
          reject(new LivemigError((e?.code as ErrorCode) ?? 'ERR_LIVEMIG_INTERNAL', e?.message ?? `HTTP ${status}`, { phase: e?.phase ?? 'api' }));
          return;
        }
        resolve({ status, body: parsed as T });
      });
    });
    req.on('error', (e) => reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot reach the daemon at ${describe(t)}: ${e.message} (is \`livemig serve\` running? see --api)`, { phase: 'api', cause: e })));
    req.end(data);
  });
}

export interface StreamEvent {
  id: string | undefined;
  event: string;
  data: Record<string, unknown>;
}

/** Follows an SSE route until the daemon ends the stream (or `stop` returns true). */
export function followEvents(t: ApiTarget, route: string, onEvent: (e: StreamEvent) => boolean | void): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.request(options(t, 'GET', route, { accept: 'text/event-stream' }), (res) => {
      if ((res.statusCode ?? 0) >= 400) {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          let e: { code?: string; message?: string } | undefined;
          try {
            e = (JSON.parse(Buffer.concat(chunks).toString('utf8')) as { error?: typeof e }).error;
          } catch {
            e = undefined;
          }
          reject(new LivemigError((e?.code as ErrorCode) ?? 'ERR_LIVEMIG_INTERNAL', e?.message ?? `HTTP ${res.statusCode}`, { phase: 'api' }));
        });
        return;
      }
      const parser = createParser({
        onEvent: (m) => {
          let data: Record<string, unknown>;
          try {
            data = JSON.parse(m.data) as Record<string, unknown>;
          } catch {
            data = { text: m.data };
          }
          if (onEvent({ id: m.id, event: m.event ?? 'message', data }) === true) {
            req.destroy();
            resolve();
          }
        },
      });
      res.setEncoding('utf8');
      res.on('data', (c: string) => parser.feed(c));
      res.on('end', () => resolve());
      res.on('error', (e) => reject(e));
    });
    req.on('error', (e) => reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot reach the daemon at ${describe(t)}: ${e.message}`, { phase: 'api', cause: e })));
    req.end();
  });
}
