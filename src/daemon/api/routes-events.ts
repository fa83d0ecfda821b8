/**
 * Server-Sent Events (@fastify/sse): GET /v1/migrations/:id/events (the migration's whole
 * history, then live until it ends) and GET /v1/events (every migration, live; with
 * Last-Event-ID, what was kept since). Each event's id is the daemon's sequence number, its
 * name the type (state, stage, round, progress, report), its data JSON.
 */
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { DaemonEvent } from '../events.js';
import { idParams } from './schemas.js';
import type { DaemonApi } from './types.js';

const FINAL = new Set(['completed', 'failed', 'cancelled', 'refused']);

export function eventRoutes(app: FastifyInstance, d: DaemonApi): void {
  app.get<{ Params: { id: string } }>(
    '/v1/migrations/:id/events',
    {
      sse: 'only',
      schema: { summary: "a migration's events (SSE): every state change, round, progress (about every 250 ms) and the report", params: idParams },
    },
    async (req, reply) => {
      const m = d.table.get(req.params.id); // 404 before the stream begins
      await stream(reply, d, m.id, () => m.done);
    },
  );
  app.get('/v1/events', { sse: 'only', schema: { summary: 'every migration’s events (SSE)' } }, async (_req, reply) => {
    await stream(reply, d, undefined, () => false);
  });
}

/** Replays what is kept after Last-Event-ID, then forwards live events in order until the final state when `ended()`. */
async function stream(reply: FastifyReply, d: DaemonApi, migration: string | undefined, ended: () => boolean): Promise<void> {
  const sse = reply.sse;
  sse.keepAlive();
  // the status and headers now, and a first comment that flushes them: @fastify/sse would hold
  // them until the first event, and a client with a header timeout drops an idle daemon's stream
  sse.sendHeaders();
  reply.raw.write(': stream open\n\n');
  const last = Number(sse.lastEventId ?? 0);
  const after = Number.isSafeInteger(last) && last > 0 ? last : 0;
  // history and subscription in the same turn: nothing published falls between them
  const queue: DaemonEvent[] = migration !== undefined || after > 0 ? d.bus.history(migration, after) : [];
  let wake: (() => void) | undefined;
  const unsubscribe = d.bus.subscribe((e) => {
    if (migration !== undefined && e.migration !== migration) return;
    queue.push(e);
    wake?.();
  });
  let closed = false;
  sse.onClose(() => {
    closed = true;
    unsubscribe();
    wake?.();
  });
  try {
    for (;;) {
      while (queue.length > 0 && !closed) {
        const e = queue.shift()!;
        try {
          await sse.send({ id: String(e.id), event: e.type, data: { migration: e.migration, ...e.data } });
        } catch (err) {
          // the client went away mid-write: nothing to answer any more
          if (!sse.isConnected) return;
          throw err;
        }
        // the migration's last event is its final state (a replayed 'running' is not the end)
        if (e.type === 'state' && FINAL.has(String(e.data['state'])) && ended()) {
          unsubscribe();
          sse.close();
          return;
        }
      }
      if (closed) return;
      // a migration that ended before this stream began: its history ends with its state
      if (migration !== undefined && ended() && queue.length === 0) {
        sse.close();
        return;
      }
      await new Promise<void>((r) => (wake = r));
      wake = undefined;
    }
  } finally {
    unsubscribe();
  }
}
