/**
 * A guest's disks at the source (MigrateOptions.disks, issue 33): they join its memory in one
 * page space, memory first, then each image whole, so that every block goes through the data
 * path pages take (holes skipped, zero blocks and references found, compression, channels,
 * encryption, pacing) and the commitment digest covers it. What was written is told by the
 * memory's tracker for its pages and a block tracker per disk (src/disk/tracking.ts) for theirs.
 */
import { fstatSync } from 'node:fs';
import { LivemigError } from '../errors.js';
import { Region } from '../region/region.js';
import { memoryTracker } from '../source/memory-tracker.js';
import type { DirtyTracker } from '../tracking/types.js';
import type { MigrateOptions } from '../source/types.js';
import { checkDisks, DISK_BLOCK } from './spec.js';
import { chooseBlockTracker, type BlockRuns, type BlockTracker } from './tracking.js';

const invalid = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', why, { phase: 'validate' });

/** The options a migration with disks runs on: the page space of memory and disks, and its tracker. */
export async function withDisks(options: MigrateOptions): Promise<{ options: MigrateOptions; trackerReason: string; close(): void }> {
  const disks = options.disks!;
  const specs = checkDisks(disks, 'disk', invalid);
  const memory = options.region;
  if (options.local) throw invalid('disks move into fresh images: not with a same-host upgrade');
  const memoryPieces = memory.pieces();
  if (memory.backing.kind !== 'shmem' || memoryPieces.some((p) => p.fd < 0))
    throw invalid("disks go with a guest whose memory is files of 4 KiB pages (a memfd per region, or the region's own)");
  disks.forEach((d, i) => {
    if (!Number.isInteger(d.fd) || d.fd < 0) throw invalid(`disk ${i} (${specs[i]!.name}): fd must be an open descriptor`);
    const st = fstatSync(d.fd);
    if (!st.isFile() && !st.isBlockDevice()) throw invalid(`disk ${i} (${specs[i]!.name}): its descriptor is neither a file nor a block device`);
    if (st.isFile() && st.size !== d.size) throw invalid(`disk ${i} (${specs[i]!.name}): the image holds ${st.size} bytes, its size says ${d.size}`);
  });
  // the joined tracker follows the memory too: how its own was to be chosen (untracked, target) is spent
  const { untracked, target, ...withoutMemoryChoice } = options;
  const pages = Region.adoptPieces([...memoryPieces, ...disks.map((d) => ({ fd: d.fd, offset: 0, size: d.size }))]);
  try {
    const forMemory = memoryTracker(memory, options, false);
    const blockTrackers = await Promise.all(
      disks.map((d) =>
        chooseBlockTracker({ fd: d.fd, path: d.path, size: d.size, blockSize: DISK_BLOCK, ...(d.written !== undefined ? { written: d.written } : {}) }),
      ),
    );
    const tracker = new DisksAndMemory(
      forMemory.tracker,
      blockTrackers,
      memory.pageCount,
      disks.map((d) => d.size),
    );
    const trackerReason =
      `the memory: ${forMemory.reason}; ` +
      blockTrackers.map((t, i) => `disk ${specs[i]!.name}: ${t.reason}${disks[i]!.trackingNote ? ` (${disks[i]!.trackingNote})` : ''}`).join('; ');
    tracker.reason = trackerReason;
    return {
      options: { ...withoutMemoryChoice, region: pages, tracker, readPath: 'files' },
      trackerReason,
      close: () => {
        for (const t of blockTrackers) t.close();
        pages.release();
      },
    };
  } catch (e) {
    pages.release();
    throw e;
  }
}

/** The memory's tracker for its pages, each disk's block tracker for the pages after them. */
class DisksAndMemory implements DirtyTracker {
  readonly pageCount: number;
  /** why these trackers, for the report (set by withDisks) */
  reason = '';
  readonly #memory: DirtyTracker;
  readonly #disks: BlockTracker[];
  readonly #firstPage: number[];

  constructor(memory: DirtyTracker, disks: BlockTracker[], memoryPages: number, diskSizes: number[]) {
    this.#memory = memory;
    this.#disks = disks;
    let at = memoryPages;
    this.#firstPage = diskSizes.map((size) => {
      const first = at;
      at += size / DISK_BLOCK;
      return first;
    });
    this.pageCount = at;
  }

  get backend(): DirtyTracker['backend'] {
    return this.#memory.backend;
  }

  async start(): Promise<void> {
    await Promise.all([this.#memory.start(), ...this.#disks.map((d) => d.arm())]);
  }

  async collect(): Promise<Uint32Array> {
    const [memory, ...disks] = await Promise.all([this.#memory.collect(), ...this.#disks.map((d) => d.collect())]);
    return this.#join(memory!, disks as BlockRuns[]);
  }

  async collectFinal(sent?: BigUint64Array): Promise<Uint32Array> {
    // the guest is paused and its VMM drained and flushed its I/O: the disks' last writes are in
    const part = (first: number, end: number): BigUint64Array | undefined => (sent && sent.length === this.pageCount ? sent.subarray(first, end) : undefined);
    const ends = [...this.#firstPage.slice(1), this.pageCount];
    const [memory, ...disks] = await Promise.all([
      this.#memory.collectFinal(part(0, this.#firstPage[0] ?? this.pageCount)),
      ...this.#disks.map((d, i) => d.collectFinal(part(this.#firstPage[i]!, ends[i]!))),
    ]);
    return this.#join(memory as Uint32Array, disks as BlockRuns[]);
  }

  async stop(): Promise<void> {
    await this.#memory.stop();
  }

  #join(memory: Uint32Array, disks: BlockRuns[]): Uint32Array {
    let n = memory.length;
    for (const runs of disks) for (let i = 0; i < runs.length; i += 2) n += runs[i + 1]! - runs[i]!;
    const out = new Uint32Array(n);
    out.set(memory);
    let k = memory.length;
    disks.forEach((runs, d) => {
      const base = this.#firstPage[d]!;
      for (let i = 0; i < runs.length; i += 2) for (let b = runs[i]!; b < runs[i + 1]!; b++) out[k++] = base + b;
    });
    return out;
  }
}
