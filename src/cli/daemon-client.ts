/** The CLI's flags for reaching a daemon (--api, --token-file) and its default sockets. */
import os from 'node:os';
import path from 'node:path';
import { readFileSync } from 'node:fs';
import type { ApiTarget } from '../daemon/client.js';
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

export { request, followEvents, type ApiTarget, type StreamEvent } from '../daemon/client.js';
