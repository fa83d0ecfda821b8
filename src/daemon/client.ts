/**
 * A client of the daemon's API (docs/API.md): JSON requests over its unix socket or TCP with
 * Node's HTTP client and a bearer token, and its Server-Sent Events read with
 * eventsource-parser. The CLI, the demo, the tests and the benchmarks use it. On TCP the daemon
 * speaks HTTPS (`tls`): its certificate is checked against `tls.ca` when given, else the
 * system's CAs (and NODE_EXTRA_CA_CERTS; a TLS proxy in front of the daemon too), for the name
 * `tls.name` or else the host; a client certificate goes when the daemon asks for one.
 */
import http from 'node:http';
import https from 'node:https';
import { createParser } from 'eventsource-parser';
import { LivemigError, type ErrorCode } from '../errors.js';

/** HTTPS to the daemon: the CA its certificate must chain to, the name it must carry, our own certificate. */
export interface ApiClientTls {
  /** PEM; absent: the system's CAs */
  ca?: Buffer;
  /** the name the daemon's certificate must carry (absent: the host dialled) */
  name?: string;
  /** PEM: this client's certificate and key, for a daemon that requires one (--api-mtls) */
  cert?: Buffer;
  key?: Buffer;
}

export type ApiTarget = { socketPath: string; token?: string } | { host: string; port: number; tls?: ApiClientTls; token?: string };

function send(t: ApiTarget, o: http.RequestOptions, onResponse: (res: http.IncomingMessage) => void): http.ClientRequest {
  if (!('tls' in t) || t.tls === undefined) return http.request(o, onResponse);
  const { ca, name, cert, key } = t.tls;
  return https.request({ ...o, ...(ca ? { ca } : {}), ...(name ? { servername: name } : {}), ...(cert && key ? { cert, key } : {}) }, onResponse);
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
  if ('socketPath' in t) return `unix:${t.socketPath}`;
  const host = t.host.includes(':') ? `[${t.host}]` : t.host;
  return `${t.tls ? 'https' : 'http'}://${host}:${t.port}`;
}

/** A TLS failure says what to check; any other, `hint`. */
function unreachable(t: ApiTarget, e: NodeJS.ErrnoException, hint: string): LivemigError {
  const tlsFailure = 'tls' in t && t.tls !== undefined && /CERT|TLS|SSL|EPROTO|ECONNRESET|alert/i.test(`${e.code ?? ''} ${e.message}`);
  const why = tlsFailure
    ? " (the daemon's certificate must chain to --api-ca or LIVEMIG_API_CA and carry the name dialled or --api-name; a daemon started with " +
      '--api-mtls wants --api-cert/--api-key; one started with --insecure-api speaks http://)'
    : hint;
  // OpenSSL's own message is its error queue, file and line included, over two lines: its reason says it
  const reason = (e as { reason?: unknown }).reason;
  const what = (typeof reason === 'string' && reason.length > 0 ? reason : e.message).replace(/\s+/g, ' ').trim();
  return new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot reach the daemon at ${describe(t)}: ${what}${why}`, { phase: 'api', cause: e });
}

/**
 * One JSON request; an error answer becomes a LivemigError with the daemon's code (and
 * `httpStatus`, `body`). A GET sent on a kept-alive connection the daemon closed meanwhile is
 * sent once more on a new one (Node's documented race of `request.reusedSocket`): a client
 * polling through minutes of migrations met it as a bare EPIPE.
 */
export async function request<T = Record<string, unknown>>(t: ApiTarget, method: string, route: string, body?: unknown): Promise<{ status: number; body: T }> {
  try {
    return await requestOnce<T>(t, method, route, body);
  } catch (e) {
    if (method !== 'GET' || !(e as { staleSocket?: boolean }).staleSocket) throw e;
    return requestOnce<T>(t, method, route, body);
  }
}

function requestOnce<T>(t: ApiTarget, method: string, route: string, body?: unknown): Promise<{ status: number; body: T }> {
  const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = send(t, options(t, method, route, data ? { 'content-type': 'application/json', 'content-length': String(data.length) } : {}), (res) => {
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
          reject(
            Object.assign(new LivemigError((e?.code as ErrorCode) ?? 'ERR_LIVEMIG_INTERNAL', e?.message ?? `HTTP ${status}`, { phase: e?.phase ?? 'api' }), {
              httpStatus: status,
              body: parsed,
            }),
          );
          return;
        }
        resolve({ status, body: parsed as T });
      });
    });
    req.on('error', (e: NodeJS.ErrnoException) => {
      const err = unreachable(t, e, ' (is `livemig serve` running? see --api, LIVEMIG_API)');
      reject(Object.assign(err, { staleSocket: req.reusedSocket && (e.code === 'ECONNRESET' || e.code === 'EPIPE') }));
    });
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
    const req = send(t, options(t, 'GET', route, { accept: 'text/event-stream' }), (res) => {
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
    req.on('error', (e) => reject(unreachable(t, e, '')));
    req.end();
  });
}
