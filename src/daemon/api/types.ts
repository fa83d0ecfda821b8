/** What the HTTP API asks of the daemon (src/daemon/daemon.ts implements it). */
import type { EventBus } from '../events.js';
import type { DaemonMetrics } from '../metrics.js';
import type { Migration, MigrationTable } from '../migration.js';
import type { MigrationRequest } from '../outgoing.js';
import type { GuestRegistry } from '../registry.js';

export interface DaemonApi {
  readonly registry: GuestRegistry;
  readonly table: MigrationTable;
  readonly bus: EventBus;
  readonly metrics: DaemonMetrics;
  readonly startedAt: Date;
  readonly shuttingDown: boolean;
  /** what the health route reports of the daemon */
  describe(): Record<string, unknown>;
  startMigration(req: MigrationRequest): Migration;
  /** how long POST /v1/migrations waits for the handshake before answering (ms) */
  readonly handshakeWaitMs: number;
  cancel(id: string): Migration;
  startPostcopy(id: string): Migration;
  update(id: string, change: { bandwidth_mib_s?: number; postcopy_bandwidth_mib_s?: number; downtime_limit_ms?: number }): Migration;
  /** extra fields of a migration's view (the destination guest's pid) */
  extra(m: Migration): Record<string, unknown>;
}
