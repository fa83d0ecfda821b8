import type net from 'node:net';
import type { Region } from '../region/region.js';
import type { DirtyTracker, RemoteTarget } from '../tracking/types.js';

export interface RoundStats {
  round: number;
  /** pages sent in this round */
  pages: number;
  /** bytes put on the wire in this round (frames included) */
  bytes: number;
  duration_ms: number;
  /** achieved throughput of this round, MB/s (10^6 bytes) */
  mbps: number;
  /** pages found dirty at the end of this round */
  dirty_pages: number;
  /** estimated downtime if we stopped now */
  estimated_downtime_ms: number;
  decision: 'continue' | 'stop';
  reason: string;
}

export type ProgressEvent =
  | { type: 'handshake'; prep_ms: number; version: number; tracker: string; tracker_reason: string }
  | ({ type: 'round' } & RoundStats)
  | { type: 'stop-and-copy'; pages: number; bytes: number }
  | { type: 'committed'; digest: string }
  | { type: 'activated'; downtime_ms: number };

export interface MigrateOptions {
  /** the guest's memory, mapped in this process */
  region: Region;
  /** where to send: host and port, or a connected socket */
  to: { host: string; port: number } | net.Socket;
  /** pauses the guest and returns its device state (an opaque blob carried to the destination) */
  pause(): Promise<Uint8Array>;
  /** resumes the guest on the source after a failure before commitment */
  resume(): Promise<void>;
  /** called once the destination has activated the guest: the source copy may go */
  release?(): Promise<void>;
  /** a tracker to use; by default the automatic choice (see chooseTracker) */
  tracker?: DirtyTracker;
  /** the guest writes from another process through its own mapping */
  target?: RemoteTarget;
  /** stop-and-copy once the remaining pages fit this pause at the measured bandwidth (default 20 ms) */
  downtimeLimitMs?: number;
  /** at most this many pre-copy rounds before stop-and-copy (default 30) */
  maxRounds?: number;
  /** bytes of page data per PAGES frame (default 1 MiB) */
  batchBytes?: number;
  /**
   * page encodings (protocol version 2; each on by default): zero pages without payload,
   * references to content the destination holds, LZ4 where it pays (see src/encoding/chooser.ts)
   */
  encodings?: { zero?: boolean; dedup?: boolean; compress?: boolean };
  /** handshake timeout (default 60 s: the destination may reserve gigabytes) */
  handshakeTimeoutMs?: number;
  onProgress?(event: ProgressEvent): void;
}

export interface MigrationReport {
  verified: boolean;
  mode: 'precopy';
  digest: string;
  prep_ms: number;
  total_ms: number;
  downtime_ms: number;
  rounds: number;
  region_bytes: number;
  wire_bytes: number;
  pages_sent: number;
  tracker: string;
  /** pages by how they went: zero (no payload), dup (a reference), lz4, raw; skipped = already there */
  zero_pages: number;
  dup_pages: number;
  lz4_pages: number;
  raw_pages: number;
  skipped_pages: number;
  /** compressed / original bytes of the pages sent as lz4 (1 when none) */
  lz4_ratio: number;
  /** whether PAGES_ENC was negotiated with the destination */
  encodings: boolean;
  per_round: RoundStats[];
  stop_and_copy: { pages: number; bytes: number; pause_ms: number; final_collect_ms: number; send_ms: number; commit_ms: number; activate_ms: number };
}
