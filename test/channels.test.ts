/**
 * Parallel channels (docs/PROTOCOL.md, "Parallel channels"): pages spread over several
 * connections end bit-identical with a guest writing hard; the receiver enforces the ordering
 * rule (a page only on its stripe's channel, a dup only naming such a page); one channel
 * breaking fails the migration cleanly with the source intact, and in post-copy the link
 * recovers; zero pages are counted, never sent.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { after, before, test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { addon } from '../src/native.js';
import { CAP_CHANNELS, CAP_COMMIT_ACTIVATE, CAP_ENCODINGS, FrameType, PageEncoding, STRIPE_PAGES } from '../src/protocol/format.js';
import type { Frame } from '../src/protocol/frame.js';
import * as M from '../src/protocol/messages.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { splitByStripe } from '../src/source/channels.js';
import { migrate } from '../src/source/migrate.js';
import { MigrationControl } from '../src/source/types.js';
import type { IncomingGuest } from '../src/guest/incoming-session.js';
import { HeartbeatObserver, SourceGuest, startReferenceIncoming } from '../src/workload/controller.js';
import type { GuestState } from '../src/workload/state.js';
import * as R from './reference/frames.js';
import { guestCheck, imageDigest, minorFaultsReason } from './helpers.js';

const MiB = 1 << 20;
let observer: HeartbeatObserver;
before(async () => {
  observer = await HeartbeatObserver.start();
});
after(() => observer.close());

test('the stripes: every page on exactly one channel, (page / STRIPE_PAGES) mod N, in ascending order', () => {
  const pages = Uint32Array.from({ length: 5000 }, (_, i) => i * 3);
  for (const n of [1, 2, 3, 4]) {
    const parts = splitByStripe(pages, n);
    assert.equal(parts.length, n);
    assert.equal(
      parts.reduce((a, p) => a + p.length, 0),
      pages.length,
      `${n} channels: every page once`,
    );
    parts.forEach((part, k) => {
      for (let i = 0; i < part.length; i++) {
        assert.equal(Math.floor(part[i]! / STRIPE_PAGES) % n, k, `page ${part[i]} on channel ${k} of ${n}`);
        if (i > 0) assert.ok(part[i]! > part[i - 1]!, 'ascending');
      }
    });
  }
});

/** A reference guest migrated live into a reference incoming guest; returns what both sides say. */
async function liveMigration(o: {
  channels: number;
  rate: number;
  pattern: 'uniform' | 'hot';
  hotSize?: number;
  size?: number;
  mbps?: number;
  compress?: false;
}) {
  const guest = await SourceGuest.spawn({
    size: o.size ?? 128 * MiB,
    content: 'mixed',
    rate: o.rate,
    pattern: o.pattern,
    ...(o.hotSize ? { hotSize: o.hotSize } : {}),
    heartbeat: observer.address,
  });
  let incoming: IncomingGuest | undefined;
  let sourceDigest = 0n;
  let destDigest = -1n;
  let paused: GuestState | undefined;
  const rx = await listen('127.0.0.1', 0, {
    onReserved: async (region, plan, layout) => {
      incoming = await startReferenceIncoming(region, layout, plan);
    },
    onDiscard: () => incoming?.kill(),
    activate: async (region, ds) => {
      destDigest = await imageDigest(region);
      await incoming!.activate(ds);
    },
  });
  const slow = o.mbps !== undefined ? await throttlingProxy(rx.port, o.mbps) : undefined;
  try {
    const received = rx.next();
    const report = await migrate({
      region: guest.region,
      ...(guest.target ? { target: guest.target } : {}),
      to: { host: '127.0.0.1', port: slow?.port ?? rx.port },
      channels: o.channels,
      // compression is chosen from how fast the link measured: pinned off where counts are compared
      ...(o.compress === false ? { encodings: { zero: true, dedup: true, compress: false } } : {}),
      downtimeLimitMs: 5,
      pause: async () => {
        const s = await guest.pause();
        paused = JSON.parse(s.toString()) as GuestState;
        sourceDigest = await imageDigest(guest.region);
        return s;
      },
      resume: () => guest.resume(),
      commit: () => guest.commit(),
      release: () => guest.exit(),
    });
    const rxReport = await received;
    const pid = incoming!.child.pid!;
    // its check after activation, waited for by its beats however long a loaded host takes
    const verify = await guestCheck({ pid, beats: () => observer.beats });
    return { report, rxReport, sourceDigest, destDigest, paused: paused!, verify };
  } finally {
    slow?.close();
    incoming?.kill();
    if (guest.child.exitCode === null) guest.kill();
    await rx.close();
  }
}

/** A proxy whose connections together carry at most `mbps` MB/s from the source: a slow link. */
async function throttlingProxy(port: number, mbps: number): Promise<{ port: number; close(): void }> {
  const live = new Set<net.Socket>();
  let next = performance.now();
  const server = net.createServer((c) => {
    const up = net.connect(port, '127.0.0.1');
    for (const x of [c, up]) {
      live.add(x);
      x.on('close', () => live.delete(x));
      x.on('error', () => undefined);
    }
    c.on('data', (d: Buffer) => {
      up.write(d);
      // the link is busy with these bytes until `next`: hold the source back until then
      next = Math.max(next, performance.now()) + d.length / 1e3 / mbps;
      const wait = next - performance.now();
      if (wait > 1) {
        c.pause();
        setTimeout(() => c.resume(), wait);
      }
    });
    up.on('data', (d: Buffer) => c.write(d));
    c.on('close', () => up.destroy());
    up.on('close', () => c.destroy());
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { port: (server.address() as net.AddressInfo).port, close: () => (server.close(), live.forEach((x) => x.destroy())) };
}

test(
  '4 channels with the guest rewriting a small hot set hard: pages rewritten while their older copies are in flight end bit-identical, and the ' +
    'guest checks every page',
  async () => {
    // 2 MiB hot set = 2 stripes, 256 MiB/s: every round resends the same pages, each time on its
    // stripe's channel, while the copies of the round before may still be in the sockets
    const r = await liveMigration({ channels: 4, rate: 256, pattern: 'hot', hotSize: 2 * MiB });
    assert.equal(r.report.channels, 4, r.report.channels_reason);
    assert.ok(r.report.rounds >= 3, `several rounds resent the hot set (${r.report.rounds})`);
    assert.ok(BigInt(r.paused.writes) > 0n, 'the guest was writing');
    assert.equal(r.destDigest, r.sourceDigest, 'the destination image equals the source image at the pause');
    assert.equal(r.rxReport.digest, r.report.digest);
    assert.deepEqual({ bad: r.verify.bad, writes: r.verify.writes }, { bad: 0, writes: r.paused.writes });
  },
);

test('on a link one connection fills, the extra channels end once its second 64 MiB are measured, later rounds on the main one, bit-identical', async () => {
  const r = await liveMigration({ channels: 2, rate: 64, pattern: 'uniform', size: 160 * MiB, mbps: 200 });
  assert.equal(r.report.channels, 2);
  assert.match(r.report.channels_reason, /the extra ones ended early: the link measured \d+ MB\/s over the 64 MiB after the first 64/);
  assert.ok(r.report.rounds >= 2, `rounds after the channels ended (${r.report.rounds})`);
  assert.equal(r.destDigest, r.sourceDigest);
  assert.deepEqual({ bad: r.verify.bad, writes: r.verify.writes }, { bad: 0, writes: r.paused.writes });
});

test('2 channels with the guest writing everywhere end bit-identical, and send what 1 channel sends', async () => {
  const two = await liveMigration({ channels: 2, rate: 128, pattern: 'uniform' });
  assert.equal(two.report.channels, 2);
  assert.equal(two.destDigest, two.sourceDigest);
  assert.equal(two.verify.bad, 0);
  // a loaded loopback measures under 600 MB/s and compresses some pages: the counts compared below
  // are of what zero detection and dedup decide, so compression is off for both
  const one = await liveMigration({ channels: 1, rate: 0, pattern: 'uniform', compress: false });
  const idle = await liveMigration({ channels: 3, rate: 0, pattern: 'uniform', compress: false });
  assert.equal(one.report.channels, 1);
  // an idle guest: the same pages go either way, zero pages counted and never sent
  assert.equal(idle.report.zero_pages, one.report.zero_pages, 'the same zero pages found on 3 channels as on 1');
  assert.ok(one.report.zero_pages > one.report.region_bytes / 4096 / 5, `a mixed guest has its quarter of zero pages (${one.report.zero_pages})`);
  assert.equal(
    one.report.raw_pages + one.report.dup_pages + one.report.zero_pages + one.report.lz4_pages,
    one.report.region_bytes / 4096,
    'every page counted once',
  );
  // each channel knows only its own stripes: the first copies of each of the 256 dup-pool pages
  // (docs/CONTENT.md) go raw on every channel (a page is indexed from its second sighting on)
  const extra = idle.report.raw_pages - one.report.raw_pages;
  assert.ok(extra >= 0 && extra <= 3 * 256 * 2, `3 channels send at most 3 x 256 raw pages more per extra channel than 1 (${extra})`);
  assert.equal(idle.report.raw_pages + idle.report.dup_pages, one.report.raw_pages + one.report.dup_pages, 'the rest went as dups instead');
});

test('zero pages of a fresh destination are counted as zero_pages and never sent, on every path', async () => {
  const region = Region.create(4096 * 4096, { name: 'ch-zero' });
  // every other stripe holds data; the rest is zero, written as zeros (a hole, never written,
  // is not read at all: test/holes.test.ts)
  for (let p = 0; p < region.pageCount; p++) region.page(p).fill(Math.floor(p / STRIPE_PAGES) % 2 === 0 ? (p % 251) + 1 : 0);
  const zero = region.pageCount / 2;
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined });
  try {
    for (const channels of [1, 2]) {
      const received = rx.next();
      const report = await migrate({
        region,
        to: { host: '127.0.0.1', port: rx.port },
        channels,
        encodings: { zero: true, dedup: false, compress: false },
        pause: async () => new Uint8Array(0),
        resume: async () => undefined,
      });
      await received;
      assert.equal(report.zero_pages, zero, `${channels} channels: every zero page counted`);
      assert.equal(report.hole_pages, 0, `${channels} channels: every page was written, none is a hole`);
      assert.ok(report.wire_bytes < (region.pageCount - zero) * 4096 * 1.01, `${channels} channels: no zero page went as bytes (${report.wire_bytes} bytes)`);
    }
  } finally {
    await rx.close();
    region.release();
  }
});

/** A proxy that passes connections through and can break the `which`-th one (1-based) after `after` bytes from the source. */
async function breakingProxy(port: number, which: number, after: number): Promise<{ port: number; broke(): boolean; close(): void }> {
  let n = 0;
  let broke = false;
  const live = new Set<net.Socket>();
  const server = net.createServer((c) => {
    const mine = ++n;
    const up = net.connect(port, '127.0.0.1');
    for (const x of [c, up]) {
      live.add(x);
      x.on('close', () => live.delete(x));
      x.on('error', () => undefined);
    }
    let seen = 0;
    c.on('data', (d: Buffer) => {
      seen += d.length;
      if (mine === which && seen > after && !broke) {
        broke = true;
        c.destroy();
        up.destroy();
        return;
      }
      up.write(d);
    });
    up.on('data', (d: Buffer) => c.write(d));
    c.on('close', () => up.destroy());
    up.on('close', () => c.destroy());
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return { port: (server.address() as net.AddressInfo).port, broke: () => broke, close: () => (server.close(), live.forEach((x) => x.destroy())) };
}

test('one channel breaking mid-round fails the migration before commitment: nothing activates, the guest is never paused, it migrates afterwards', async () => {
  const region = Region.create(8192 * 4096, { name: 'ch-break' });
  for (let p = 0; p < region.pageCount; p++)
    region
      .page(p)
      .fill((p * 7) % 253)
      .writeUInt32LE(p, 0); // no two alike
  const before = await imageDigest(region);
  let activated = 0;
  let paused = 0;
  const rx = await listen('127.0.0.1', 0, { activate: async () => void activated++ });
  try {
    for (const which of [2, 3]) {
      // connection 1 is the main one; 2 and 3 are channels 1 and 2 (opened in that order or not: either is a channel)
      const px = await breakingProxy(rx.port, which, 2 * MiB);
      const received = rx.next();
      received.catch(() => undefined);
      await assert.rejects(
        migrate({
          region,
          to: { host: '127.0.0.1', port: px.port },
          channels: 3,
          bandwidthMiBps: 200,
          pause: async () => (paused++, new Uint8Array(0)),
          resume: async () => undefined,
        }),
        (e: unknown) => e instanceof LivemigError && /ERR_LIVEMIG_(CONNECTION|REFUSED)/.test(e.code),
      );
      assert.ok(px.broke(), 'the channel was broken mid-round');
      const outcome = await received.then(
        () => undefined,
        (e: unknown) => e as LivemigError,
      );
      assert.ok(outcome instanceof LivemigError, 'the destination discarded its copy');
      px.close();
    }
    assert.equal(activated, 0, 'nothing activated');
    assert.equal(paused, 0, 'the guest was never paused');
    assert.equal(await imageDigest(region), before, 'the source memory is untouched');
    const received = rx.next();
    const report = await migrate({
      region,
      to: { host: '127.0.0.1', port: rx.port },
      channels: 3,
      pause: async () => new Uint8Array(0),
      resume: async () => undefined,
    });
    assert.equal((await received).digest, report.digest, 'the same source migrates afterwards');
    assert.equal(report.channels, 3);
  } finally {
    await rx.close();
    region.release();
  }
});

/** A raw source speaking to a receiver: HELLO on the main connection, then frames on any connection. */
async function rawSession(
  channels: number,
  caps: string[],
): Promise<{ port: number; main: RawConn; accept: M.Accept; attach(k: number): Promise<RawConn>; outcome: Promise<LivemigError>; close(): Promise<void> }> {
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined, idleTimeoutMs: 5000 });
  const outcome = rx.next().then(
    () => {
      throw new Error('the receiver accepted a stream that breaks the rule');
    },
    (e: unknown) => e as LivemigError,
  );
  const main = await RawConn.open(rx.port);
  main.write(
    M.encodeHello({
      versions: [3, 3],
      regionBytes: 2048 * 4096,
      pageSize: 4096,
      auth: null,
      capabilities: [CAP_CHANNELS, CAP_COMMIT_ACTIVATE, ...caps],
      channels,
    }),
  );
  const accept = M.decodeAccept((await main.frame(FrameType.Accept)).payload);
  const opened: RawConn[] = [main];
  return {
    port: rx.port,
    main,
    accept,
    attach: async (k) => {
      const c = await RawConn.open(rx.port);
      opened.push(c);
      c.write(M.encodeAttach({ session: accept.session!, role: 'channel', channel: k }, 3));
      return c;
    },
    outcome,
    close: async () => {
      for (const c of opened) c.sock.destroy();
      await rx.close();
    },
  };
}

class RawConn {
  readonly got: Frame[] = [];
  readonly #waiters: (() => void)[] = [];
  private constructor(readonly sock: net.Socket) {
    const parser = new R.FrameParser();
    sock.on('data', (c) =>
      parser.push(c, (f) => {
        this.got.push(f);
        for (const w of this.#waiters.splice(0)) w();
      }),
    );
    sock.on('error', () => undefined);
  }
  static async open(port: number): Promise<RawConn> {
    const sock = net.connect(port, '127.0.0.1');
    await once(sock, 'connect');
    return new RawConn(sock);
  }
  write(b: Buffer): void {
    this.sock.write(b);
  }
  async frame(type: FrameType): Promise<Frame> {
    for (;;) {
      const f = this.got.find((g) => g.type === type || g.type === FrameType.Error);
      if (f) {
        if (f.type === FrameType.Error && type !== FrameType.Error) throw new Error(`ERROR: ${M.decodeError(f.payload).message}`);
        return f;
      }
      await new Promise<void>((r) => this.#waiters.push(r));
    }
  }
}

function pagesFrame(indices: number[], round = 1): Buffer {
  const pages = Uint32Array.from(indices);
  const b = Buffer.alloc(R.pagesFrameBytes(pages.length, 4096));
  R.writePagesPrefix(b, round, pages, 3);
  return b;
}

test('bad channel counts are refused with exact messages before anything listens or connects', async () => {
  await assert.rejects(listen('127.0.0.1', 0, { activate: async () => undefined, maxChannels: 0 }), /maxChannels must be an integer from 1 to 16, got 0/);
  await assert.rejects(
    listen('127.0.0.1', 0, { activate: async () => undefined, maxChannels: Number.NaN }),
    /maxChannels must be an integer from 1 to 16, got NaN/,
  );
  const region = Region.create(16 * 4096, { name: 'ch-bad' });
  try {
    for (const channels of [0, 17, 1.5]) {
      await assert.rejects(
        migrate({ region, to: { host: '127.0.0.1', port: 9 }, channels, pause: async () => new Uint8Array(0), resume: async () => undefined }),
        (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_INVALID_ARGUMENT' && /channels must be an integer from 1 to 16/.test(e.message),
      );
    }
  } finally {
    region.release();
  }
});

test('the receiver grants at most what was asked, and a channel beyond the grant is refused', async () => {
  const s = await rawSession(2, []);
  try {
    assert.equal(s.accept.channels, 2);
    assert.ok(s.accept.capabilities.includes(CAP_CHANNELS));
    const c = await s.attach(2);
    const e = M.decodeError((await c.frame(FrameType.Error)).payload);
    assert.equal(e.code, 'ERR_LIVEMIG_PROTOCOL');
    assert.match(e.message, /granted 2 channels/);
  } finally {
    await s.close();
  }
});

test("a page on a channel that is not its stripe's is refused with ERR_LIVEMIG_PAGE_INDEX, and the source hears it on the main connection", async () => {
  const s = await rawSession(2, []);
  try {
    const c = await s.attach(1);
    await c.frame(FrameType.Attached);
    c.write(pagesFrame([STRIPE_PAGES])); // stripe 1: channel 1's, fine
    c.write(pagesFrame([5])); // stripe 0: the main connection's
    const err = await s.outcome;
    assert.equal(err.code, 'ERR_LIVEMIG_PAGE_INDEX');
    assert.match(err.message, /page 5 arrived on channel 1 of 2, but its stripe goes on channel 0/);
    const told = M.decodeError((await s.main.frame(FrameType.Error)).payload);
    assert.equal(told.code, 'ERR_LIVEMIG_PAGE_INDEX', 'the main connection carries the cause');
  } finally {
    await s.close();
  }
});

test("the main connection takes only its own stripes until the channels ended, and a dup may not name another channel's page", async () => {
  const s = await rawSession(2, []);
  try {
    s.main.write(pagesFrame([STRIPE_PAGES + 1])); // channel 1's stripe, on the main connection
    const err = await s.outcome;
    assert.equal(err.code, 'ERR_LIVEMIG_PAGE_INDEX');
  } finally {
    await s.close();
  }
  const d = await rawSession(2, [CAP_ENCODINGS]);
  try {
    const c = await d.attach(1);
    await c.frame(FrameType.Attached);
    const zeroHash = Buffer.alloc(8);
    zeroHash.writeBigUInt64LE(addon.zeroPageHash());
    const body = Buffer.concat([zeroHash, Buffer.from(Uint32Array.of(0).buffer)]); // page 0 holds zero: but it is channel 0's
    c.write(R.encodePagesEnc(1, [{ index: STRIPE_PAGES, encoding: PageEncoding.Dup, body }], 3));
    const err = await d.outcome;
    assert.equal(err.code, 'ERR_LIVEMIG_PROTOCOL');
    assert.match(err.message, /dup reference to page 0 on channel 1: that page's stripe goes on another channel/);
  } finally {
    await d.close();
  }
});

test('DEVICE_STATE before the channels ended is a protocol error, nothing activates', async () => {
  const s = await rawSession(2, []);
  try {
    await (await s.attach(1)).frame(FrameType.Attached);
    s.main.write(M.encodeDeviceState(new Uint8Array(4), 3));
    const err = await s.outcome;
    assert.equal(err.code, 'ERR_LIVEMIG_PROTOCOL');
    assert.match(err.message, /before the extra channels ended/);
  } finally {
    await s.close();
  }
});

const noPostcopy = minorFaultsReason();
if (noPostcopy) console.log(`# skipping the post-copy channel test: ${noPostcopy}`);

test(
  'hybrid over 2 channels: the pass goes on both, post-copy on its own connections, and a link cut in post-copy recovers',
  { skip: noPostcopy },
  async () => {
    let incoming: IncomingGuest | undefined;
    const rx = await listen('127.0.0.1', 0, {
      onReserved: async (region, plan, layout) => {
        incoming = await startReferenceIncoming(region, layout, plan);
      },
      onDiscard: () => incoming?.kill(),
      postcopy: { register: () => incoming!.register() },
      activate: async (_r, ds) => incoming!.activate(ds),
      recoverTimeoutMs: 20_000,
    });
    const guest = await SourceGuest.spawn({ size: 128 * MiB, content: 'mixed', rate: 128, pattern: 'uniform', heartbeat: observer.address });
    const live = new Set<net.Socket>();
    let connections = 0;
    const proxy = net.createServer((c) => {
      connections++;
      const up = net.connect(rx.port, '127.0.0.1');
      for (const x of [c, up]) {
        live.add(x);
        x.on('close', () => live.delete(x));
        x.on('error', () => undefined);
      }
      c.pipe(up);
      up.pipe(c);
    });
    proxy.listen(0, '127.0.0.1');
    await once(proxy, 'listening');
    try {
      const received = rx.next();
      let cut = false;
      const report = await migrate({
        region: guest.region,
        ...(guest.target ? { target: guest.target } : {}),
        to: { host: '127.0.0.1', port: (proxy.address() as net.AddressInfo).port },
        channels: 2,
        mode: 'hybrid',
        control: new MigrationControl(),
        // slow enough that post-copy still pushes when its first progress event comes
        bandwidthMiBps: 100,
        pause: () => guest.pause(),
        resume: () => guest.resume(),
        commit: () => guest.commit(),
        release: () => guest.exit(),
        onProgress: (e) => {
          if (e.type === 'postcopy' && !cut && e.pages_pushed > 10) {
            cut = true;
            for (const x of live) x.destroy(); // every connection at once; new ones get through
          }
        },
      });
      const rxReport = await received;
      assert.equal(report.channels, 2);
      assert.equal(report.mode, 'hybrid');
      assert.ok(cut, 'the link was cut during post-copy');
      assert.ok(report.postcopy!.reconnects >= 1, 'the source reconnected');
      assert.equal(rxReport.digest, report.digest, 'the same image on both sides');
      assert.ok(connections >= 5, `main, channel 1, priority, then the reconnection's two (${connections})`);
      incoming!.allPresent();
      const pid = incoming!.pid;
      assert.equal((await guestCheck({ pid, beats: () => observer.beats })).bad, 0);
    } finally {
      proxy.close();
      incoming?.kill();
      if (guest.child.exitCode === null) guest.kill();
      await rx.close();
    }
  },
);
