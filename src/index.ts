export { LivemigError, ErrorCodes, type ErrorCode } from './errors.js';
export { Region, PAGE_SIZE, type CreateRegionOptions } from './region/region.js';
export { GuestLayout, MAX_GUEST_REGIONS, type RegionSpec, type LayoutRegion } from './guest/layout.js';
export {
  GUEST_CONTRACT,
  GUEST_CONTRACT_OLDEST,
  parseSourceHello,
  parseIncomingHello,
  type SourceHello,
  type IncomingHello,
  type GuestRegion,
} from './guest/contract.js';
export { SourceGuestSession } from './guest/source-session.js';
export { IncomingGuest, type IncomingStart } from './guest/incoming-session.js';
export * from './tracking/index.js';
export { xxh64 } from './pages/hash.js';
export { migrate } from './source/migrate.js';
export { MigrationControl, type MigrateOptions, type MigrationReport, type ProgressEvent, type RoundStats } from './source/types.js';
export type { StallAction } from './precopy/policy.js';
export { receiveOn, type ReceiveOptions, type ReceiveReport, type ReceiveProgress } from './receiver/receiver.js';
export { listen, type Receiver } from './receiver/listen.js';
