export type { BackendName, DirtyTracker, RemoteTarget } from './types.js';
export { UffdAsyncTracker, protectOwnRegion, type WriteProtection } from './uffd-async.js';
export { SoftDirtyTracker } from './soft-dirty.js';
export { HashTracker } from './hash.js';
export { ExternalTracker, bitmapToPages, type DirtyReport } from './external.js';
export { probe, chooseTracker, type BackendProbe, type ChooseOptions, type TrackerChoice } from './probe.js';
