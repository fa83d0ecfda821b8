/**
 * A client of the daemon's API (docs/API.md): JSON requests over its unix socket or TCP with
 * Node's HTTP client and a bearer token, and its Server-Sent Events read with
 * eventsource-parser. The CLI, the demo, the tests and the benchmarks use it. `tls` is for an
 * API behind a TLS proxy (the daemon itself serves plain HTTP): the proxy's certificate is
 * checked against the system's CAs (and NODE_EXTRA_CA_CERTS).
 */
import http from 'node:http';
import https from 'node:https';
import { createParser } from 'eventsource-parser';
import { LivemigError, type ErrorCode } from '../errors.js';

export type ApiTarget = { socketPath: string; token?: string } | { host: string; port: number; tls?: boolean; token?: string };

function send(t: ApiTarget, o: http.RequestOptions, onResponse: (res: http.IncomingMessage) => void): http.ClientRequest {
  return 'tls' in t && t.tls === true ? https.request(o, onResponse) : http.request(o, onResponse);
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
  return `${t.tls === true ? 'https' : 'http'}://${host}:${t.port}`;
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
    req.on('error', (e) => {
      const code = (e as NodeJS.ErrnoException).code;
      const err = new LivemigError(
        'ERR_LIVEMIG_CONNECTION',
        `cannot reach the daemon at ${describe(t)}: ${e.message} (is \`livemig serve\` running? see --api, LIVEMIG_API)`,
        { phase: 'api', cause: e },
      );
      reject(Object.assign(err, { staleSocket: req.reusedSocket && (code === 'ECONNRESET' || code === 'EPIPE') }));
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
    req.on('error', (e) =>
      reject(new LivemigError('ERR_LIVEMIG_CONNECTION', `cannot reach the daemon at ${describe(t)}: ${e.message}`, { phase: 'api', cause: e })),
    );
    req.end();
  });
}
