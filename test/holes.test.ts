/**
 * Holes: a guest whose memory is mostly never written (the reference guest's `sparse` content,
 * as a real VM's RAM is) migrates bit-identical; the pages it holds no data for are neither
 * read on the source (so the source host does not allocate them) nor sent nor allocated on the
 * destination; a hole the guest writes during the migration arrives.
 */
import assert from 'node:assert/strict';
import { pack } from 'msgpackr';
import { describe, test } from 'node:test';
import { listen } from '../src/receiver/listen.js';
import type { ReceiveReport } from '../src/receiver/types.js';
import { migrate } from '../src/source/migrate.js';
import type { MigrateOptions } from '../src/source/types.js';
import { extentPages, coarsen, checkExtents } from '../src/pages/extents.js';
import { decodeHello, encodeHello } from '../src/protocol/messages.js';
import { CAP_HOLES, MAX_RESIDENT_RUNS } from '../src/protocol/format.js';
import type { IncomingGuest } from '../src/guest/incoming-session.js';
import { HeartbeatObserver, SourceGuest, startReferenceIncoming } from '../src/workload/controller.js';
import type { GuestState } from '../src/workload/state.js';
import { Region } from '../src/region/region.js';
import { guestCheck, minorFaultsReason } from './helpers.js';

const MiB = 1 << 20;
const SIZE = 256 * MiB;
const PAGES = SIZE / 4096;

test('data extents come from the file: a fresh region is all hole, a written page is data, and reading neither allocates', async () => {
  const r = Region.create(64 * 4096, { name: 'holes-test' });
  try {
    assert.deepEqual([...(await r.dataExtents())], []);
    r.page(3).fill(7);
    r.page(4).fill(7);
    r.page(40).fill(1);
    assert.deepEqual([...(await r.dataExtents())], [3, 5, 40, 41]);
    // populating only the data extents for reading allocates nothing more
    await r.populateAsync(false, await r.dataExtents());
    assert.deepEqual([...(await r.dataExtents())], [3, 5, 40, 41]);
    // allocated but never written still reads as zero, and shmem says hole (not uptodate)
    await r.allocate(Float64Array.of(10, 12));
    assert.deepEqual([...(await r.dataExtents())], [3, 5, 40, 41]);
    assert.ok(r.page(10).equals(Buffer.alloc(4096)));
    await assert.rejects(r.allocate(Float64Array.of(12, 10)), /out of order/);
  } finally {
    r.release();
  }
});

test("HELLO's resident hint: at most MAX_RESIDENT_RUNS runs covering every data page, checked like any hostile value", () => {
  const runs = Float64Array.from({ length: 2 * (MAX_RESIDENT_RUNS + 10) }, (_, i) => Math.floor(i / 2) * 4 + (i % 2));
  const hint = coarsen(runs, MAX_RESIDENT_RUNS);
  // equal gaps: only the 10 joins needed, not every gap (which would reserve the whole span)
  assert.equal(hint.length / 2, MAX_RESIDENT_RUNS);
  assert.equal(extentPages(hint), extentPages(runs) + 10 * 3);
  checkExtents(hint, 1 << 20);
  for (let i = 0; i < runs.length; i += 2) {
    const p = runs[i]!;
    let covered = false;
    for (let k = 0; k < hint.length && !covered; k += 2) covered = hint[k]! <= p && p < hint[k + 1]!;
    assert.ok(covered, `page ${p} is in the hint`);
  }
  const hello = { versions: [3, 3] as [number, number], regionBytes: 1 << 24, pageSize: 4096, auth: null, capabilities: [CAP_HOLES] };
  const round = decodeHello(encodeHello({ ...hello, resident: Float64Array.of(0, 2, 10, 4096) }).subarray(12));
  assert.deepEqual([...round.resident!], [0, 2, 10, 4096]);
  for (const bad of [Float64Array.of(5, 3), Float64Array.of(0, 4097), Float64Array.of(4, 8, 2, 3)])
    assert.throws(() => decodeHello(encodeHello({ ...hello, resident: bad }).subarray(12)), /HELLO resident/);
});

test("HELLO's resident hint in more runs than it holds goes as a chunk map, exact at 64 KiB up to 16 GiB, checked like any hostile value", () => {
  const pageCount = (16 * 1024 * MiB) / 4096;
  // ~15000 runs of 64 KiB at uneven gaps, as the sparse guest's data lies
  const data: number[] = [];
  let seed = 7;
  for (let p = 0; p + 16 <= pageCount;) {
    data.push(p, p + 16);
    seed = (seed * 1103515245 + 12345) % 2 ** 31;
    p += 16 * (2 + (seed % 30));
  }
  const resident = Float64Array.from(data);
  const hello = { versions: [3, 3] as [number, number], regionBytes: pageCount * 4096, pageSize: 4096, auth: null, capabilities: [CAP_HOLES] };
  const frame = encodeHello({ ...hello, resident });
  assert.ok(frame.length < 40 * 1024, `HELLO of ${frame.length} bytes`);
  const got = decodeHello(frame.subarray(12)).resident!;
  assert.deepEqual([...got], [...resident], 'the map is exact: every run here is whole 64 KiB chunks');
  assert.ok(extentPages(coarsen(resident, MAX_RESIDENT_RUNS)) > 4 * extentPages(got), 'joined runs would have covered far more');
  const base = { versions: [3, 3], regionBytes: 1 << 24, pageSize: 4096, auth: null, capabilities: [CAP_HOLES] };
  const map = (chunk: number, bits: number[]): Buffer => Buffer.concat([Buffer.from(Uint32Array.of(chunk).buffer), Buffer.from(bits)]);
  // 4096 pages in chunks of 16: 256 chunks, 32 bytes
  assert.deepEqual([...decodeHello(pack({ ...base, residentMap: map(16, [0b101, ...Array(31).fill(0)]) }) as Buffer).resident!], [0, 16, 32, 48]);
  for (const [bad, why] of [
    [{ residentMap: map(3, Array(32).fill(0)) }, /power of two/],
    [{ residentMap: map(16, Array(31).fill(0)) }, /one bit per chunk/],
    [{ residentMap: map(1024, [0b10000]) }, /beyond the region/],
    [{ residentMap: 'no' }, /binary/],
    [{ residentMap: map(16, Array(32).fill(0)), resident: Buffer.alloc(8) }, /one at most/],
  ] as const)
    assert.throws(() => decodeHello(pack({ ...base, ...bad }) as Buffer), why);
});

/** A receiver with a reference guest behind it; the destination's allocation measured before its guest runs. */
async function setup(
  rate: number,
  prealloc = false,
): Promise<{
  guest: SourceGuest;
  observer: HeartbeatObserver;
  result: Promise<ReceiveReport>;
  port: number;
  incoming: () => IncomingGuest;
  destinationData: () => number;
  close(): Promise<void>;
}> {
  let incoming: IncomingGuest | undefined;
  let destinationData = -1;
  const rx = await listen('127.0.0.1', 0, {
    ...(prealloc ? { prealloc: true } : {}),
    onReserved: async (region, plan, layout) => {
      incoming = await startReferenceIncoming(region, layout, plan);
    },
    onDiscard: () => incoming?.kill(),
    postcopy: {
      register: async (region) => {
        destinationData = extentPages(await region.dataExtents());
        return incoming!.register();
      },
    },
    activate: async (region, ds) => {
      if (destinationData < 0) destinationData = extentPages(await region.dataExtents());
      await incoming!.activate(ds);
    },
  });
  const observer = await HeartbeatObserver.start();
  const guest = await SourceGuest.spawn({ size: SIZE, content: 'sparse', rate, pattern: 'uniform', heartbeat: observer.address });
  const result = rx.next();
  result.catch(() => undefined);
  return {
    guest,
    observer,
    result,
    port: rx.port,
    incoming: () => incoming!,
    destinationData: () => destinationData,
    close: async () => {
      guest.kill();
      incoming?.kill();
      observer.close();
      await rx.close();
    },
  };
}

/**
 * Migrates the sparse guest in `mode`; checks that the source allocated no page but those the
 * guest wrote meanwhile, and returns what each side said.
 */
async function migrateSparse(mode: NonNullable<MigrateOptions['mode']>, rate: number, o: { readPath?: MigrateOptions['readPath']; prealloc?: boolean } = {}) {
  const s = await setup(rate, o.prealloc);
  const g = s.guest;
  try {
    const before = extentPages(await g.region.dataExtents());
    const writesBefore = BigInt((await g.state()).writes);
    let atPause = -1;
    let atRelease = -1;
    let paused: GuestState | undefined;
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: s.port },
      pause: async () => {
        const st = await g.pause();
        paused = JSON.parse(st.toString()) as GuestState;
        atPause = extentPages(await g.region.dataExtents());
        return st;
      },
      resume: () => g.resume(),
      commit: () => g.commit(),
      // (after post-copy too: the source's last check of its image must not read the holes either)
      release: async () => {
        atRelease = extentPages(await g.region.dataExtents());
        await g.exit();
      },
      mode,
      ...(o.readPath ? { readPath: o.readPath } : {}),
    });
    const rx = await s.result;
    assert.equal(rx.digest, report.digest, 'both sides hold the same image');
    const written = Number(BigInt(paused!.writes) - writesBefore);
    // the source's memory grew by what the guest wrote, never by what livemig read
    assert.ok(atRelease - before <= written, `the source allocated ${atRelease - before} pages by its release; the guest wrote ${written} times`);
    assert.ok(before < PAGES / 4, `the sparse guest holds data in ${before} of ${PAGES} pages`);
    // every page the source held no data for at the first pass is counted, not sent
    assert.ok(report.hole_pages >= PAGES - atPause, `hole pages ${report.hole_pages}, data at the pause ${atPause}`);
    // the destination allocated only what holds data (its guest not yet running)
    assert.ok(s.destinationData() >= 0 && s.destinationData() <= atPause, `destination allocated ${s.destinationData()} pages, the source holds ${atPause}`);
    if (mode !== 'precopy') s.incoming().allPresent();
    const check = await guestCheck({ pid: s.incoming().pid, beats: () => s.observer.beats });
    assert.equal(check.bad, 0, 'every page, holes included, checks out at the destination');
    return { report, rx, written };
  } finally {
    await s.close();
  }
}

describe('a sparse guest', () => {
  // each read path of the source, and the destination written through its files and, preallocated, through its mapping
  for (const [readPath, prealloc] of [
    ['files', false],
    ['mapping', true],
  ] as const) {
    const how = `pre-copy read through the ${readPath}${prealloc ? ', the destination preallocated' : ''}`;
    test(`${how}: holes are neither read nor sent nor allocated, a hole written meanwhile arrives`, async () => {
      const { report, written } = await migrateSparse('precopy', 4, { readPath, prealloc });
      assert.equal(report.read_path, readPath);
      assert.ok(written > 0, 'the guest wrote during the migration');
      assert.ok(report.pages_sent < PAGES / 4, `${report.pages_sent} pages sent of ${PAGES}`);
    });
  }

  const noMinor = minorFaultsReason();
  test('post-copy from the start: only the pages that hold data are needed', { skip: noMinor }, async () => {
    const { report, rx } = await migrateSparse('postcopy', 4);
    assert.equal(report.postcopy!.pages_needed, PAGES - report.hole_pages);
    assert.equal(rx.postcopy!.pages_pulled + rx.postcopy!.pages_pushed, report.postcopy!.pages_needed, 'every needed page crossed once');
  });

  test('hybrid: after a pass without holes, the stale pages come by post-copy and the holes stay holes', { skip: noMinor }, async () => {
    const { report } = await migrateSparse('hybrid', 64);
    assert.ok(report.postcopy!.pages_needed > 0);
  });
});
