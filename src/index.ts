export { LivemigError, ErrorCodes, type ErrorCode } from './errors.js';
export { Region, PAGE_SIZE, type CreateRegionOptions } from './region/region.js';
export { GuestListener, handOverRegion, parseHello, type GuestHello, type GuestConnection } from './region/handover.js';
export * from './tracking/index.js';
export { xxh64 } from './pages/hash.js';
export { migrate } from './source/migrate.js';
export { MigrationControl, type MigrateOptions, type MigrationReport, type ProgressEvent, type RoundStats } from './source/types.js';
export type { StallAction } from './precopy/policy.js';
export { receiveOn, listen, type ReceiveOptions, type ReceiveReport, type ReceiveProgress, type Receiver } from './receiver/receiver.js';
