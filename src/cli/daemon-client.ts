/**
 * The CLI's flags for reaching a daemon (--api, --token-file, --api-ca, --api-name,
 * --api-cert/--api-key, or LIVEMIG_API, LIVEMIG_TOKEN_FILE, LIVEMIG_API_CA, LIVEMIG_API_NAME,
 * LIVEMIG_API_CERT/LIVEMIG_API_KEY in the environment: the flags win) and its default sockets.
 */
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { ApiClientTls, ApiTarget } from '../daemon/client.js';
import { usageError, type FlagValues, type Flags } from './flags.js';
import { readSecretFile } from './secret-file.js';

/** Where a daemon's sockets are by default: /run/livemig as root, a private directory otherwise. */
export function defaultDaemonDir(): string {
  return process.getuid?.() === 0 ? '/run/livemig' : path.join(os.tmpdir(), `livemig-${process.getuid?.() ?? 'user'}`);
}

export const DEFAULT_API = (): string => `unix:${path.join(defaultDaemonDir(), 'api.sock')}`;

export const API_ENV = 'LIVEMIG_API';
export const TOKEN_FILE_ENV = 'LIVEMIG_TOKEN_FILE';
export const API_CA_ENV = 'LIVEMIG_API_CA';
export const API_NAME_ENV = 'LIVEMIG_API_NAME';
export const API_CERT_ENV = 'LIVEMIG_API_CERT';
export const API_KEY_ENV = 'LIVEMIG_API_KEY';

/** the forms --api takes, for its help and its errors */
export const API_FORMS = 'unix:PATH|/PATH|HOST:PORT|http://HOST:PORT|https://HOST:PORT';

export const CLIENT_FLAGS: Flags = {
  api: {
    type: 'string',
    value: API_FORMS,
    help:
      `the daemon's API: a unix socket, or TCP: HOST:PORT and https:// speak HTTPS, http:// plain HTTP (a daemon started with --insecure-api) ` +
      `(default $${API_ENV}, else ${DEFAULT_API()})`,
  },
  'token-file': {
    type: 'string',
    value: 'FILE',
    help: `the API's bearer token, a file only its owner can read (required when the API is on TCP; default $${TOKEN_FILE_ENV})`,
  },
  'api-ca': {
    type: 'string',
    value: 'FILE',
    help: `HTTPS: the CA (PEM) the daemon's certificate must chain to, the daemon's --tls-ca (default $${API_CA_ENV}, else the system's CAs)`,
  },
  'api-name': {
    type: 'string',
    value: 'NAME',
    help: `HTTPS: the name the daemon's certificate must carry (default $${API_NAME_ENV}, else the host in --api)`,
  },
  'api-cert': {
    type: 'string',
    value: 'FILE',
    help: `HTTPS: this client's certificate (PEM), for a daemon started with --api-mtls (with --api-key; default $${API_CERT_ENV})`,
  },
  'api-key': {
    type: 'string',
    value: 'FILE',
    help: `its private key (PEM), a file only its owner can read (default $${API_KEY_ENV})`,
  },
  json: { type: 'boolean', default: false, help: 'print JSON (one object per line) instead of text' },
};

/** `tls`: HTTPS (HOST:PORT and https://), or plain HTTP (http://) */
export type ApiAddress = { path: string } | { host: string; port: number; tls: boolean };

/** A unix socket path fits sun_path: 1..107 bytes. */
function socketPath(p: string, from: string): { path: string } {
  if (p.length === 0 || Buffer.byteLength(p) > 107) throw usageError(`${from}: a unix socket path is 1..107 characters, got '${p}'`);
  return { path: p };
}

const HOST = /^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])$/;

function tcp(host: string, portText: string, tls: boolean, text: string, from: string): ApiAddress {
  const port = Number(portText);
  if (!HOST.test(host) || !/^[0-9]{1,5}$/.test(portText) || port > 65535)
    throw usageError(`${from}: '${text}' is not a daemon address: give ${API_FORMS.split('|').join(', ')}`);
  // node's HTTP client takes an IPv6 address without its brackets
  return { host: host.startsWith('[') ? host.slice(1, -1) : host, port, tls };
}

/**
 * Where the daemon's API is: `unix:PATH` or a path (`/…`, `./…`), `HOST:PORT` (HTTPS, as the
 * daemon serves TCP), or a URL `https://HOST:PORT` or `http://HOST:PORT` (plain: a daemon's
 * --insecure-api) with no path and no credentials. Anything else is refused with the value
 * named; `from` says where it came from (the flag, or the environment).
 */
export function parseApiAddress(text: string, from = '--api'): ApiAddress {
  if (text.startsWith('unix:')) return socketPath(text.slice(5), from);
  if (text.startsWith('/') || text.startsWith('./') || text.startsWith('../')) return socketPath(text, from);
  const url = /^(https?):\/\/([^/?#@]+?):([^/?#@:\]]*)\/?$/i.exec(text);
  if (url) return tcp(url[2]!, url[3]!, url[1]!.toLowerCase() === 'https', text, from);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text) || text.includes('/'))
    throw usageError(`${from}: '${text}' is not a daemon address: give ${API_FORMS.split('|').join(', ')} (a URL has no path and names its port)`);
  const i = text.lastIndexOf(':');
  if (i <= 0) throw usageError(`${from}: '${text}' is not a daemon address: give ${API_FORMS.split('|').join(', ')}`);
  return tcp(text.slice(0, i), text.slice(i + 1), true, text, from);
}

export function readToken(file: string, from = '--token-file'): string {
  const t = readSecretFile(file, from).toString('utf8').trim();
  if (t.length < 16 || /\s/.test(t)) throw usageError(`${from}: ${file} must hold one token of at least 16 characters without spaces`);
  return t;
}

/** A flag's value, else the environment's (an empty variable counts as unset); and where it came from. */
export function flagOrEnv(v: FlagValues, flag: string, env: string): { value: string; from: string } | undefined {
  const given = v[flag];
  if (typeof given === 'string') return { value: given, from: `--${flag}` };
  const e = process.env[env];
  return e !== undefined && e.length > 0 ? { value: e, from: env } : undefined;
}

function readPem(file: string, from: string): Buffer {
  try {
    return readFileSync(file);
  } catch (e) {
    throw usageError(`${from}: cannot read ${file}: ${(e as Error).message}`);
  }
}

const TLS_FLAGS = [
  ['api-ca', API_CA_ENV],
  ['api-name', API_NAME_ENV],
  ['api-cert', API_CERT_ENV],
  ['api-key', API_KEY_ENV],
] as const;

/**
 * The HTTPS settings the flags (or the environment) give. Given as flags to a target that is
 * not HTTPS they are refused, not ignored; from the environment they are only not used there.
 */
function clientTls(v: FlagValues, https: boolean, api: string): ApiClientTls | undefined {
  const given = Object.fromEntries(TLS_FLAGS.map(([flag, env]) => [flag, flagOrEnv(v, flag, env)]));
  if (!https) {
    const flag = TLS_FLAGS.find(([f]) => typeof v[f] === 'string');
    if (flag) throw usageError(`--${flag[0]} is for an HTTPS API (HOST:PORT or https://HOST:PORT), not ${api}`);
    return undefined;
  }
  const { 'api-ca': ca, 'api-name': name, 'api-cert': cert, 'api-key': key } = given;
  if ((cert === undefined) !== (key === undefined))
    throw usageError(`a client certificate needs both --api-cert and --api-key (or ${API_CERT_ENV} and ${API_KEY_ENV}): ${(cert ?? key)!.from} came alone`);
  return {
    ...(ca ? { ca: readPem(ca.value, ca.from) } : {}),
    ...(name ? { name: name.value } : {}),
    ...(cert && key ? { cert: readPem(cert.value, cert.from), key: readSecretFile(key.value, key.from) } : {}),
  };
}

export function targetFrom(v: FlagValues): ApiTarget {
  const api = flagOrEnv(v, 'api', API_ENV) ?? { value: DEFAULT_API(), from: '--api' };
  const a = parseApiAddress(api.value, api.from);
  const tokenFile = flagOrEnv(v, 'token-file', TOKEN_FILE_ENV);
  const token = tokenFile ? readToken(tokenFile.value, tokenFile.from) : undefined;
  const tls = clientTls(v, !('path' in a) && a.tls, api.value);
  const base: ApiTarget = 'path' in a ? { socketPath: a.path } : { host: a.host, port: a.port, ...(tls ? { tls } : {}) };
  return token ? { ...base, token } : base;
}

export { request, followEvents, type ApiTarget, type StreamEvent } from '../daemon/client.js';
