/** GET /metrics: Prometheus exposition of the daemon's registry (prom-client). */
import type { FastifyInstance } from 'fastify';
import type { DaemonApi } from './types.js';

export function metricsRoutes(app: FastifyInstance, d: DaemonApi): void {
  app.get('/metrics', { schema: { summary: 'Prometheus metrics', produces: ['text/plain'] } }, async (_req, reply) => {
    reply.header('content-type', d.metrics.registry.contentType);
    return d.metrics.registry.metrics();
  });
}
