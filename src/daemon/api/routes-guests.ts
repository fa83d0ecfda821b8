/** GET /v1/health, GET /v1/guests, GET /v1/guests/:name, POST /v1/guests, DELETE /v1/guests/:name */
import type { FastifyInstance } from 'fastify';
import { LivemigError } from '../../errors.js';
import { errorBody, guestRegistration, nameParams } from './schemas.js';
import type { DaemonApi } from './types.js';

const guest = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    kind: { type: 'string', enum: ['contract', 'qemu'], description: 'registered on the guest socket (docs/GUEST.md), or a QEMU VM by its QMP socket' },
    pid: { type: 'integer' },
    state: { type: 'string', enum: ['idle', 'migrating'] },
    bytes: { type: 'integer' },
    tracking: { type: 'string', description: "uffd-wp-async: the guest's writes are tracked exactly; none: livemig hashes its pages each round" },
    regions: { type: 'array', items: { type: 'object', properties: { id: { type: 'integer' }, name: { type: 'string' }, bytes: { type: 'integer' } } } },
    registered_at: { type: 'string' },
    migration: { type: 'string' },
    qemu: {
      type: 'object',
      description: "a QEMU VM: its QMP socket, its RAM's file, and why its writes are tracked as they are (the preload library, or hashing)",
      properties: { qmp: { type: 'string' }, ram: { type: 'string' }, tracking_reason: { type: 'string' } },
    },
  },
} as const;

export function guestRoutes(app: FastifyInstance, d: DaemonApi): void {
  app.get(
    '/v1/health',
    { schema: { summary: 'whether the daemon is up (no token needed)', response: { 200: { type: 'object', additionalProperties: true } } } },
    async () => d.describe(),
  );
  app.get(
    '/v1/guests',
    { schema: { summary: 'guests registered here', response: { 200: { type: 'object', properties: { guests: { type: 'array', items: guest } } } } } },
    async () => ({ guests: d.registry.list() }),
  );
  app.get<{ Params: { name: string } }>(
    '/v1/guests/:name',
    { schema: { summary: 'one registered guest', params: nameParams, response: { 200: guest, 404: errorBody } } },
    async (req) => {
      const g = d.registry.info(req.params.name);
      if (!g) throw new LivemigError('ERR_LIVEMIG_NOT_FOUND', `no guest named ${JSON.stringify(req.params.name)} is registered here`, { phase: 'api' });
      return g;
    },
  );
  app.post<{ Body: { name: string; qemu: { qmp: string } } }>(
    '/v1/guests',
    {
      schema: {
        summary: 'register a running QEMU VM by its QMP socket',
        description:
          'The VM is checked as `livemig send --qemu` checks it (running, its RAM one memory-backend-file with share=on, QEMU mapping it) and let go: ' +
          'it is taken over QMP again for each migration. Refused (409 ERR_LIVEMIG_QEMU) with the reason and the -object to use; a name or VM ' +
          'registered already: 409 ERR_LIVEMIG_CONFLICT.',
        body: guestRegistration,
        response: { 201: guest, 400: errorBody, 409: errorBody, 503: errorBody },
      },
    },
    async (req, reply) => {
      if (d.shuttingDown) throw new LivemigError('ERR_LIVEMIG_SHUTTING_DOWN', 'the daemon is shutting down: it registers no guest', { phase: 'api' });
      const g = await d.registry.registerQemu(req.body.name, req.body.qemu.qmp);
      return reply.code(201).header('location', `/v1/guests/${g.name}`).send(g);
    },
  );
  app.delete<{ Params: { name: string } }>(
    '/v1/guests/:name',
    {
      schema: {
        summary: 'unregister a QEMU VM (it runs on, untouched)',
        description: 'A guest that registered itself on the guest socket is listed while its connection lasts: 409 ERR_LIVEMIG_STATE.',
        params: nameParams,
        response: { 200: guest, 404: errorBody, 409: errorBody },
      },
    },
    async (req) => d.registry.unregister(req.params.name),
  );
}
