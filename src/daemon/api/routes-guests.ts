/** GET /v1/health, GET /v1/guests, GET /v1/guests/:name */
import type { FastifyInstance } from 'fastify';
import { LivemigError } from '../../errors.js';
import { errorBody, nameParams } from './schemas.js';
import type { DaemonApi } from './types.js';

const guest = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    pid: { type: 'integer' },
    state: { type: 'string', enum: ['idle', 'migrating'] },
    bytes: { type: 'integer' },
    tracking: { type: 'string' },
    regions: { type: 'array', items: { type: 'object', properties: { id: { type: 'integer' }, name: { type: 'string' }, bytes: { type: 'integer' } } } },
    registered_at: { type: 'string' },
    migration: { type: 'string' },
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
}
