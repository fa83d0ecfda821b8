/**
 * Huge pages under a guest's memory (src/region/huge-pages.ts): a hugetlbfs region's write is
 * collected as the 512 pages of its huge page by uffd-wp and as the page itself by hashing; a
 * hugetlbfs guest (the reference guest, and the C guest's two regions) migrates bit-identical
 * with each tracking backend that works here while it writes, onto hugetlbfs pages at the
 * destination too; a shmem THP guest likewise onto THP. That huge pages were really used is
 * read from /proc/meminfo while it runs. The pool (vm.nr_hugepages) and the THP policy are
 * set for a test and put back after it; where they cannot be, the test is skipped with why.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pack } from 'msgpackr';
import { allowShmemThp, lockHost, meminfo, reserveHugePages, type HostSetting } from '../bench/huge-host.js';
import { runDemo, type DemoReport, type GuestSpec } from '../src/demo/demo.js';
import { LivemigError } from '../src/errors.js';
import { decodeHello } from '../src/protocol/messages.js';
import { HUGE_PAGE_SIZE, freeHugePages, probeHugePages } from '../src/region/huge-pages.js';
import { Region } from '../src/region/region.js';
import { HashTracker } from '../src/tracking/hash.js';
import { chooseTracker, probe } from '../src/tracking/probe.js';
import type { DirtyTracker } from '../src/tracking/types.js';
import { UffdAsyncTracker } from '../src/tracking/uffd-async.js';
import { assertSamePages } from './helpers.js';

const MiB = 1 << 20;
const PAGES_PER_HUGE = HUGE_PAGE_SIZE / 4096;
const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const guest = (o: Partial<GuestSpec>): GuestSpec => ({ size: 64 * MiB, content: 'mixed', rate: 64, pattern: 'uniform', hotSize: 64 * MiB, ...o });

/**
 * Runs `fn` with the host setting in place and puts it back after; skips (printing why) where it
 * cannot be set. The pool and the policy are the host's, not this process's: another copy of the
 * suite (or a benchmark) beside this one would set and restore them under it, so each test holds
 * the host's lock from setting them to putting them back.
 */
async function withHost(t: { skip(why: string): void; diagnostic(m: string): void }, setting: () => HostSetting, fn: () => Promise<void>): Promise<void> {
  const unlock = await lockHost();
  try {
    const host = setting();
    if (host.skip) {
      t.diagnostic(`skipped: ${host.skip}`);
      t.skip(host.skip);
      return;
    }
    try {
      await fn();
    } finally {
      host.restore();
    }
  } finally {
    unlock();
  }
}

/** The lowest (or highest) value of a meminfo counter seen while `run` runs, sampled every 5 ms. */
async function watchMeminfo<T>(name: string, run: () => Promise<T>): Promise<{ result: T; min: number; max: number; before: number }> {
  const before = meminfo(name);
  let min = before;
  let max = before;
  const timer = setInterval(() => {
    const v = meminfo(name);
    min = Math.min(min, v);
    max = Math.max(max, v);
  }, 5);
  try {
    return { result: await run(), min, max, before };
  } finally {
    clearInterval(timer);
  }
}

function flip(region: Region, page: number, at: number): void {
  const b = region.page(page);
  b[at] = b[at]! ^ 0xff;
}

function assertMigratedWhileWriting(r: DemoReport): void {
  assert.equal(r.verified, true, 'digests match');
  assert.equal(r.guest_verified.bad, 0, `the destination guest found page ${r.guest_verified.first_bad} wrong`);
  assert.ok(BigInt(r.guest_verified.writes) > 0n, 'the guest wrote while it migrated');
  // pages written during pre-copy went again after the first pass (and the guest found them all)
  const firstPass = r.per_round[0]!.pages;
  assert.ok(r.pages_sent > firstPass, `pages written during pre-copy were sent again (${r.pages_sent} sent, ${firstPass} in the first pass)`);
}

test('a hugetlbfs region: a write is collected as its whole huge page by uffd-wp, as itself by hashing', async (t) => {
  const size = 8 * MiB;
  await withHost(
    t,
    () => reserveHugePages(size),
    async () => {
      const free = freeHugePages(HUGE_PAGE_SIZE)!;
      assert.equal(probeHugePages().find((h) => h.kind === 'hugetlb')!.available, true, '`livemig probe` sees the free pages');
      const region = Region.create(size, { hugePages: 'hugetlb', reserve: true });
      try {
        assert.deepEqual(region.backing, { kind: 'hugetlb', pageSize: HUGE_PAGE_SIZE });
        assert.equal(region.pageSize, 4096, 'the wire keeps 4 KiB pages');
        assert.equal(freeHugePages(HUGE_PAGE_SIZE), free - size / HUGE_PAGE_SIZE, 'the region took its pages from the pool');
        region.view().fill(1);
        const trackers: [string, () => DirtyTracker, number[]][] = [
          [
            'uffd-async',
            () => new UffdAsyncTracker(region),
            [...Array(PAGES_PER_HUGE).keys()].flatMap((i) => [PAGES_PER_HUGE + i, 3 * PAGES_PER_HUGE + i]).sort((a, b) => a - b),
          ],
          ['hash', () => new HashTracker(region), [PAGES_PER_HUGE + 5, 4 * PAGES_PER_HUGE - 1]],
        ];
        for (const [name, make, want] of trackers) {
          if (name === 'uffd-async' && !uffd.available) {
            t.diagnostic(`uffd-async skipped: ${uffd.reason}`);
            continue;
          }
          const tracker = make();
          await tracker.start();
          try {
            flip(region, PAGES_PER_HUGE + 5, 100); // inside huge page 1
            flip(region, 4 * PAGES_PER_HUGE - 1, 4095); // the last 4 KiB page of huge page 3
            assertSamePages(await tracker.collect(), want, `${name} after two writes`);
            assertSamePages(await tracker.collect(), [], `${name} with nothing written since`);
          } finally {
            await tracker.stop();
          }
        }
        // soft-dirty would see no write on hugetlbfs: never chosen, and refused when asked for
        assert.throws(
          () => chooseTracker(region, { backend: 'soft-dirty' }),
          (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_UNSUPPORTED',
        );
        assert.notEqual(chooseTracker(region).backend, 'soft-dirty');
      } finally {
        region.release();
      }
    },
  );
});

test('a hugetlbfs region larger than the free pool is refused before the kernel is asked', () => {
  const free = freeHugePages(HUGE_PAGE_SIZE) ?? 0;
  assert.throws(
    () => Region.create((free + 1) * HUGE_PAGE_SIZE, { hugePages: 'hugetlb' }),
    (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_NO_MEMORY' && /nr_hugepages/.test(e.message),
  );
  assert.throws(() => Region.create(HUGE_PAGE_SIZE + 4096, { hugePages: 'hugetlb' }), /multiple of its page size/);
});

test("HELLO's backing is checked like any value from the network", () => {
  const hello = { versions: [3, 3], regionBytes: 64 * MiB, pageSize: 4096, auth: null, capabilities: [] };
  const decode = (extra: object) => decodeHello(pack({ ...hello, ...extra }) as Buffer);
  assert.deepEqual(decode({ backing: { kind: 'hugetlb', pageSize: HUGE_PAGE_SIZE } }).backing, { kind: 'hugetlb', pageSize: HUGE_PAGE_SIZE });
  assert.equal(decode({}).backing, undefined);
  const refused = (extra: object, why: RegExp) =>
    assert.throws(
      () => decode(extra),
      (e: unknown) => e instanceof Error && why.test(e.message),
    );
  refused({ backing: 'hugetlb' }, /backing must be a map/);
  refused({ backing: { kind: 'ramfs', pageSize: HUGE_PAGE_SIZE } }, /kind must be/);
  refused({ backing: { kind: 'hugetlb', pageSize: 3 * MiB } }, /power of two/);
  refused({ backing: { kind: 'hugetlb', pageSize: 2 ** 31 } }, /power of two/);
  refused({ backing: { kind: 'hugetlb', pageSize: 4096 } }, /power of two from 8 KiB/);
  refused({ regionBytes: 65 * MiB, backing: { kind: 'hugetlb', pageSize: HUGE_PAGE_SIZE } }, /multiple of 2097152/);
  refused(
    {
      regions: [
        { id: 0, name: 'a', size: 63 * MiB },
        { id: 1, name: 'b', size: MiB },
      ],
      backing: { kind: 'hugetlb', pageSize: HUGE_PAGE_SIZE },
    },
    /every region's size must be a multiple/,
  );
});

for (const backend of ['uffd-async', 'hash'] as const) {
  const skip = backend === 'uffd-async' && !uffd.available ? uffd.reason : false;
  test(`a hugetlbfs guest migrates bit-identical onto hugetlbfs, tracked by ${backend}, while it writes`, { skip }, async (t) => {
    const g = guest({ hugePages: 'hugetlb', noTrack: backend === 'hash' });
    // the source guest and the destination's reservation each hold the region
    await withHost(
      t,
      () => reserveHugePages(2 * g.size),
      async () => {
        const { result: r, min, before } = await watchMeminfo('HugePages_Free', () => runDemo({ guest: g }));
        assertMigratedWhileWriting(r);
        assert.equal(r.tracker, backend);
        assert.deepEqual(r.backing, { kind: 'hugetlb', page_size: HUGE_PAGE_SIZE, tracking_page_size: backend === 'uffd-async' ? HUGE_PAGE_SIZE : 4096 });
        const pages = g.size / HUGE_PAGE_SIZE;
        assert.ok(before - min >= 2 * pages, `both sides held hugetlbfs pages: HugePages_Free went from ${before} down to ${min}, ${2 * pages} expected`);
      },
    );
  });
}

test("the C guest's two hugetlbfs regions migrate bit-identical while it writes", { skip: uffd.available ? false : uffd.reason }, async (t) => {
  const bytes = (192 + 64) * MiB; // its regions
  await withHost(
    t,
    () => reserveHugePages(2 * bytes),
    async () => {
      const { result: r, min, before } = await watchMeminfo('HugePages_Free', () => runDemo({ guest: guest({ hugePages: 'hugetlb' }), guestKind: 'c' }));
      assertMigratedWhileWriting(r);
      assert.equal(r.tracker, 'uffd-async');
      assert.equal(r.backing.kind, 'hugetlb');
      assert.ok(before - min >= (2 * bytes) / HUGE_PAGE_SIZE, `both sides held hugetlbfs pages: HugePages_Free ${before} -> ${min}`);
    },
  );
});

test('a hugetlbfs guest is not offered to post-copy, which fills 4 KiB at a time', async (t) => {
  const g = guest({ hugePages: 'hugetlb', size: 8 * MiB });
  await withHost(
    t,
    () => reserveHugePages(2 * g.size),
    async () => {
      await assert.rejects(
        runDemo({ guest: g, policy: { mode: 'postcopy' } }),
        (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_UNSUPPORTED' && /hugetlbfs/.test(e.message),
      );
    },
  );
});

test('a shmem THP guest migrates bit-identical onto THP while it writes', { skip: uffd.available ? false : uffd.reason }, async (t) => {
  const g = guest({ hugePages: 'thp' });
  await withHost(
    t,
    () => allowShmemThp(),
    async () => {
      const { result: r, max, before } = await watchMeminfo('ShmemHugePages', () => runDemo({ guest: g }));
      assertMigratedWhileWriting(r);
      // uffd-wp splits a THP's mapping to protect it: the pages stay huge, tracking is per 4 KiB
      assert.deepEqual(r.backing, { kind: 'shmem-thp', page_size: HUGE_PAGE_SIZE, tracking_page_size: 4096 });
      const kib = (2 * g.size) / 1024;
      assert.ok(max - before >= kib, `both sides held shmem huge pages: ShmemHugePages went from ${before} kB up to ${max} kB, ${kib} kB more expected`);
    },
  );
});
