/**
 * POST /v1/migrations, GET /v1/migrations[/:id], PATCH /v1/migrations/:id,
 * POST /v1/migrations/:id/cancel, POST /v1/migrations/:id/postcopy
 */
import type { FastifyInstance } from 'fastify';
import type { Migration } from '../migration.js';
import type { MigrationRequest } from '../outgoing.js';
import { statusOf } from './errors.js';
import { errorBody, idParams, listQuery, migrationPatch, migrationRequest, migrationView } from './schemas.js';
import type { DaemonApi } from './types.js';

const created = { type: 'object', properties: { id: { type: 'string' }, state: { type: 'string' }, stage: { type: 'string' } } } as const;

export function migrationRoutes(app: FastifyInstance, d: DaemonApi): void {
  const view = (m: Migration, o?: { detail: boolean }): Record<string, unknown> => ({ ...m.view(o), ...d.extra(m) });

  app.post<{ Body: MigrationRequest }>(
    '/v1/migrations',
    {
      schema: {
        summary: 'migrate a registered guest to another daemon',
        description:
          'Answers once the destination has taken the migration (its handshake: the region is reserved there), or at once when it is queued. A ' +
          'migration refused before any page moved answers with its error (409 ERR_LIVEMIG_NO_MEMORY when it does not fit the destination) and the ' +
          'migration id; the guest keeps running here.',
        body: migrationRequest,
        response: { 201: created, 400: errorBody, 404: errorBody, 409: errorBody, 502: errorBody, 503: errorBody, 504: errorBody },
      },
    },
    async (req, reply) => {
      const m = d.startMigration(req.body);
      if (m.state !== 'queued') {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([m.admitted, new Promise((r) => (timer = setTimeout(r, d.handshakeWaitMs)))]);
        clearTimeout(timer);
      }
      if (m.done && m.state !== 'completed') {
        const e = m.error!;
        return reply.code(statusOf(e.code)).send({ error: { code: e.code, message: e.message, phase: e.phase ?? m.stage }, id: m.id });
      }
      return reply.code(201).header('location', `/v1/migrations/${m.id}`).send({ id: m.id, state: m.state, stage: m.stage });
    },
  );

  app.get<{ Querystring: { state?: string; direction?: string; since?: string } }>(
    '/v1/migrations',
    {
      schema: {
        summary: "migrations here, both directions (oldest first), those of the daemon's earlier runs its history kept included",
        querystring: listQuery,
        response: { 200: { type: 'object', properties: { migrations: { type: 'array', items: migrationView } } } },
      },
    },
    async (req) => {
      const { state, direction, since } = req.query;
      // the schema took only an RFC 3339 time, which Date.parse reads whole
      const from = since === undefined ? undefined : Date.parse(since);
      return {
        migrations: d.table
          .list()
          .filter(
            (m) =>
              (state === undefined || m.state === state) &&
              (direction === undefined || m.direction === direction) &&
              (from === undefined || m.createdAt.getTime() >= from),
          )
          .map((m) => view(m, { detail: false })),
      };
    },
  );

  app.get<{ Params: { id: string } }>(
    '/v1/migrations/:id',
    {
      schema: {
        summary: 'one migration: state, stage, progress, rounds and, when done, its report',
        params: idParams,
        response: { 200: migrationView, 404: errorBody },
      },
    },
    async (req) => view(d.table.get(req.params.id)),
  );

  app.patch<{ Params: { id: string }; Body: { bandwidth_mib_s?: number; postcopy_bandwidth_mib_s?: number; downtime_limit_ms?: number } }>(
    '/v1/migrations/:id',
    {
      schema: {
        summary: 'change a running outgoing migration: its bandwidth cap, its downtime limit',
        params: idParams,
        body: migrationPatch,
        response: { 200: migrationView, 404: errorBody, 409: errorBody },
      },
    },
    async (req) => view(d.update(req.params.id, req.body)),
  );

  app.post<{ Params: { id: string } }>(
    '/v1/migrations/:id/cancel',
    {
      schema: {
        summary: 'cancel an outgoing migration before its point of commitment (the guest keeps running here)',
        params: idParams,
        response: { 202: migrationView, 404: errorBody, 409: errorBody },
      },
    },
    async (req, reply) => reply.code(202).send(view(d.cancel(req.params.id))),
  );

  app.post<{ Params: { id: string } }>(
    '/v1/migrations/:id/postcopy',
    {
      schema: {
        summary: 'switch a running outgoing migration to post-copy at the end of its round',
        params: idParams,
        response: { 202: migrationView, 404: errorBody, 409: errorBody },
      },
    },
    async (req, reply) => reply.code(202).send(view(d.startPostcopy(req.params.id))),
  );
}
