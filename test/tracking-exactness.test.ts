/**
 * Every working backend reports exactly the pages written, round after round, whoever writes:
 * the main thread, a worker thread of the tracking process, or another process that handed
 * its memfd over. And with a writer running concurrently, no write is ever lost.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { Region } from '../src/region/region.js';
import { SourceGuestSession } from '../src/guest/source-session.js';
import { chooseTracker, probe, type BackendName, type DirtyTracker, ExternalTracker } from '../src/tracking/index.js';
import { ChildGuest, GiB, WorkerWriter, abstractSocket, assertSamePages } from './helpers.js';
import { pagesForRound, writeRound } from './fixtures/writes.js';

const SIZE = Number(process.env.LIVEMIG_TEST_REGION_BYTES ?? GiB);
const ROUNDS = 100;
const probes = probe();
for (const p of probes) if (!p.available) console.log(`# tracking backend ${p.backend} unavailable here: ${p.reason}`);

let region: Region;
let words: Uint32Array;
let worker: WorkerWriter;
let guestConn: SourceGuestSession;
let guest: ChildGuest;
let roundBase = 0; // every round of the file writes a value no earlier round wrote

before(async () => {
  const path = abstractSocket('exact');
  const child = ChildGuest.spawn(path, SIZE, probes[0]!.available ? 'uffd-async' : 'none');
  region = Region.create(SIZE, { name: 'exactness', reserve: true, populate: true });
  const v = region.view();
  words = new Uint32Array(v.buffer, v.byteOffset, region.size / 4);
  worker = await WorkerWriter.start(region.shareId);
  guestConn = await SourceGuestSession.connect(path, { timeoutMs: 120_000, child });
  assert.equal(guestConn.layout.regions.length, 2, 'the guest hands over two regions');
  guest = new ChildGuest(child);
});

after(async () => {
  await worker?.close();
  await guest?.close();
  guestConn?.close();
  region?.release();
});

type Writer = (pages: Uint32Array, round: number) => Promise<void>;

async function runRounds(tracker: DirtyTracker, write: Writer, report?: (pages: Uint32Array) => void): Promise<void> {
  await tracker.start();
  try {
    for (let r = 0; r < ROUNDS; r++) {
      const pages = pagesForRound(r, tracker.pageCount);
      await write(pages, roundBase + r);
      report?.(pages);
      assertSamePages(await tracker.collect(), pages, `${tracker.backend} round ${r}`);
    }
    assert.equal((await tracker.collect()).length, 0, 'a collect with no writes reports nothing');
  } finally {
    roundBase += ROUNDS + 1;
    await tracker.stop();
  }
}

const mainWriter: Writer = async (pages, round) => writeRound(words, region.pageSize, pages, round);

for (const backend of ['uffd-async', 'soft-dirty', 'hash', 'external'] as BackendName[]) {
  const status = probes.find((p) => p.backend === backend)!;
  const skip = status.available ? false : `${backend} unavailable here: ${status.reason}`;

  describe(`${backend} exactness over ${ROUNDS} rounds on ${SIZE / GiB} GiB`, { skip }, () => {
    const make = (target?: SourceGuestSession): DirtyTracker =>
      chooseTracker(target ? target.region : region, {
        backend,
        ...(target && backend !== 'hash' && backend !== 'external' && target.target ? { target: target.target } : {}),
      }).tracker;

    test('writes from the main thread', async () => {
      const t = make();
      await runRounds(t, mainWriter, t instanceof ExternalTracker ? (p) => t.markDirty(p) : undefined);
    });

    test('writes from a worker thread', async () => {
      const t = make();
      // external: the integrator reports a bitmap, as a KVM dirty log would
      const toBitmap = (pages: Uint32Array): Uint8Array => {
        const b = new Uint8Array(Math.ceil(t.pageCount / 8));
        for (const p of pages) b[p >>> 3]! |= 1 << (p & 7);
        return b;
      };
      await runRounds(t, (p, r) => worker.write(p, r), t instanceof ExternalTracker ? (p) => t.markDirty(toBitmap(p)) : undefined);
    });

    test('writes from a separate process that handed over its memfd', async (ctx) => {
      if (backend === 'uffd-async' && guestConn.tracking !== 'uffd-wp-async') return ctx.skip('guest could not register');
      const t = make(guestConn);
      await runRounds(t, (p, r) => guest.write(p, r), t instanceof ExternalTracker ? (p) => t.markDirty(p) : undefined);
    });

    test('a concurrent writer never loses a write', { skip: backend === 'external' ? 'external: the integrator owns the report' : false }, async () => {
      const t = make();
      await concurrentWriterCheck(t, backend === 'hash' ? 12 : 300);
    });
  });
}

/**
 * A worker writes random pages non-stop and logs (page, collects started before the write)
 * after each write. Each write must show up in a collect no earlier than the one running when
 * it was made, and no later than the first collect that started after it was logged.
 */
async function concurrentWriterCheck(tracker: DirtyTracker, collects: number): Promise<void> {
  const capacity = 3_000_000;
  const log = new SharedArrayBuffer(8 + 8 * capacity);
  const ctl = new SharedArrayBuffer(8);
  const logI = new Int32Array(log);
  const ctlI = new Int32Array(ctl);
  await tracker.start();
  const done = worker.request<{ writes: number }>({ op: 'concurrent', log, epoch: ctl, count: capacity });
  const sets: Uint32Array[] = [];
  const startPos: number[] = [];
  for (let k = 0; k < collects; k++) {
    startPos.push(Atomics.load(logI, 0));
    Atomics.store(ctlI, 0, k + 1);
    sets.push(await tracker.collect());
  }
  Atomics.store(ctlI, 1, 1);
  const { writes } = await done;
  startPos.push(Atomics.load(logI, 0));
  Atomics.store(ctlI, 0, collects + 1);
  sets.push(await tracker.collect());
  await tracker.stop();
  assert.ok(writes > 1000, `the writer made only ${writes} writes`);
  assert.ok(
    sets.slice(0, -1).some((s) => s.length > 0),
    'no collect overlapped a write',
  );

  const seenIn = new Map<number, number[]>();
  sets.forEach((s, j) => {
    for (const p of s) {
      let l = seenIn.get(p);
      if (!l) seenIn.set(p, (l = []));
      l.push(j);
    }
  });
  let k = 0;
  const earliest = new Map<number, number>();
  for (let i = 0; i < writes; i++) {
    const page = logI[2 + 2 * i]!;
    const epochBefore = logI[3 + 2 * i]!;
    while (k < startPos.length && startPos[k]! <= i) k++;
    const lo = Math.max(0, epochBefore - 1);
    const hi = Math.min(k, sets.length - 1);
    const seen = seenIn.get(page) ?? [];
    assert.ok(
      seen.some((j) => j >= lo && j <= hi),
      `write #${i} to page ${page} (made during collect ${lo}, logged before collect ${hi}) is in no collect between; seen in [${seen.join(',')}]`,
    );
    earliest.set(page, Math.min(earliest.get(page) ?? Infinity, lo));
  }
  for (const [page, js] of seenIn) {
    const first = earliest.get(page);
    assert.ok(first !== undefined && js[0]! >= first, `page ${page} was reported but never written`);
  }
}
