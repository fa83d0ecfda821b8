/**
 * The daemon's HTTP API (fastify): JSON schemas on every route (a request that fails one gets
 * 400 ERR_LIVEMIG_INVALID_ARGUMENT), one error handler mapping LivemigError codes to statuses
 * (errors.ts), a bearer token on every route but /v1/health when one is configured (required
 * on TCP, where it is served over HTTPS: ApiTls), the OpenAPI document at /v1/openapi.json. One
 * concern per file: routes-*.ts.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { ServerOptions as HttpsOptions } from 'node:https';
import Fastify, { type FastifyError, type FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import { fastifySSE as sse } from '@fastify/sse';
import { LivemigError } from '../../errors.js';
import { statusOf } from './errors.js';
import { eventRoutes } from './routes-events.js';
import { guestRoutes } from './routes-guests.js';
import { metricsRoutes } from './routes-metrics.js';
import { migrationRoutes } from './routes-migrations.js';
import type { DaemonApi } from './types.js';
import { describeValidation } from './validation.js';

/** SSE keep-alive comments, so that proxies and clients see a quiet stream is alive */
const SSE_HEARTBEAT_MS = 15_000;
/** request bodies are small JSON objects */
const BODY_LIMIT = 64 * 1024;

/**
 * The API on TCP over HTTPS (fastify's own `https`): the daemon's certificate and key, and with
 * `requireClientCert` a client certificate that chains to `ca` is required of every connection
 * (the TLS handshake refuses one without), the bearer token still asked on top.
 */
export interface ApiTls {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
  requireClientCert: boolean;
}

export async function buildApi(d: DaemonApi, o: { token: string | undefined; version: string; tls?: ApiTls | undefined }): Promise<FastifyInstance> {
  const common = {
    logger: false,
    bodyLimit: BODY_LIMIT,
    // a field the schema does not name is an error, not silently dropped; no type coercion
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, allErrors: false } },
  };
  // (an HTTPS fastify is typed over https.Server; the routes and hooks are the same)
  const app = (o.tls ? Fastify({ ...common, https: httpsOptions(o.tls) }) : Fastify(common)) as unknown as FastifyInstance;
  // every body is JSON: one of another type is refused (415), not parsed as a string to fail the schema
  app.removeContentTypeParser('text/plain');
  await app.register(swagger, {
    openapi: {
      info: {
        title: 'livemig daemon API',
        version: o.version,
        description: 'Live memory migration: registered guests, migrations, their events and metrics (docs/API.md).',
      },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: o.token ? [{ bearer: [] }] : [],
    },
  });
  await app.register(sse, { heartbeatInterval: SSE_HEARTBEAT_MS });

  const expected = o.token === undefined ? undefined : digest(o.token);
  app.addHook('onRequest', async (req, reply) => {
    (req as unknown as { t0: number }).t0 = performance.now();
    if (!expected || req.url === '/v1/health') return;
    const h = req.headers.authorization;
    const given = typeof h === 'string' && h.startsWith('Bearer ') ? digest(h.slice(7)) : undefined;
    if (!given || !timingSafeEqual(given, expected)) {
      reply.header('www-authenticate', 'Bearer realm="livemig"');
      throw new LivemigError(
        'ERR_LIVEMIG_UNAUTHORIZED',
        h ? 'the bearer token is not the one this daemon was given' : 'this API needs "Authorization: Bearer <token>" (the daemon\'s --token-file)',
        { phase: 'api' },
      );
    }
  });
  app.addHook('onResponse', async (req) => {
    const t0 = (req as unknown as { t0?: number }).t0;
    if (t0 !== undefined) d.metrics.apiRequest(req.routeOptions.url ?? 'unknown', (performance.now() - t0) / 1e3);
  });

  // @fastify/sse answers 406 itself, in its own shape, to a client that refuses text/event-stream
  app.addHook('onSend', async (_req, reply, payload) => {
    if (reply.statusCode !== 406) return payload;
    reply.type('application/json');
    const message = "this route answers only Server-Sent Events: ask with 'Accept: text/event-stream'";
    return JSON.stringify({ error: { code: 'ERR_LIVEMIG_INVALID_ARGUMENT', message, phase: 'validate' } });
  });

  app.setErrorHandler((err: FastifyError | LivemigError, req, reply) => {
    if ((err as FastifyError).validation) {
      const { message, field } = describeValidation(err as FastifyError, req);
      return reply.code(400).send({ error: { code: 'ERR_LIVEMIG_INVALID_ARGUMENT', message, phase: 'validate', ...(field ? { field } : {}) } });
    }
    if (err instanceof LivemigError) {
      return reply.code(statusOf(err.code)).send({ error: { code: err.code, message: err.message, phase: err.phase ?? 'api' } });
    }
    const status = (err as FastifyError).statusCode;
    // fastify's own 4xx (a body that is not JSON, too large, a wrong content type)
    if (status !== undefined && status >= 400 && status < 500) {
      return reply
        .code(status)
        .send({ error: { code: 'ERR_LIVEMIG_INVALID_ARGUMENT', message: ownMessage(err as FastifyError, req.headers), phase: 'validate' } });
    }
    return reply.code(500).send({ error: { code: 'ERR_LIVEMIG_INTERNAL', message: err.message, phase: 'api' } });
  });
  app.setNotFoundHandler((req, reply) =>
    reply.code(404).send({ error: { code: 'ERR_LIVEMIG_NOT_FOUND', message: `no route ${req.method} ${req.url}`, phase: 'api' } }),
  );

  guestRoutes(app, d);
  migrationRoutes(app, d);
  eventRoutes(app, d);
  metricsRoutes(app, d);
  app.get('/v1/openapi.json', { schema: { hide: true } }, async () => app.swagger());
  await app.ready();
  return app;
}

/** fastify's own refusals, said with what to send instead */
function ownMessage(err: FastifyError, headers: Record<string, string | string[] | undefined>): string {
  if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return `the body is larger than ${BODY_LIMIT / 1024} KiB: the API's bodies are small JSON objects`;
  if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    const type = String(headers['content-type'] ?? '').slice(0, 64);
    return `the body must be JSON with 'Content-Type: application/json', got '${type}'`;
  }
  return err.message;
}

function httpsOptions(t: ApiTls): HttpsOptions {
  return {
    cert: t.cert,
    key: t.key,
    minVersion: 'TLSv1.2',
    ...(t.requireClientCert ? { ca: t.ca, requestCert: true, rejectUnauthorized: true } : {}),
  };
}

function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}
