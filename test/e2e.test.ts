/**
 * End to end on loopback with the reference guest writing all the time: the image arrives
 * bit-identical, the destination guest continues the source's heartbeat and counters, and
 * failures before commitment leave the source guest running and unchanged.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { createInterface } from 'node:readline';
import { after, before, test } from 'node:test';
import { LivemigError } from '../src/errors.js';
import { migrate } from '../src/source/migrate.js';
import { listen } from '../src/receiver/listen.js';
import { verifyContent } from '../src/workload/content.js';
import type { IncomingGuest } from '../src/guest/incoming-session.js';
import { HeartbeatObserver, SourceGuest, startReferenceIncoming } from '../src/workload/controller.js';
import type { GuestState } from '../src/workload/state.js';
import { guestCheck, here, imageDigest, until } from './helpers.js';
import path from 'node:path';

const SIZE = Number(process.env.LIVEMIG_TEST_E2E_BYTES ?? 256 * 1024 * 1024);
const guestOpts = { size: SIZE, content: 'mixed', rate: 64, pattern: 'uniform' };
let observer: HeartbeatObserver;

before(async () => {
  observer = await HeartbeatObserver.start();
});
after(() => observer.close());

async function writesOf(guest: SourceGuest): Promise<bigint> {
  return BigInt((await guest.state()).writes);
}

/** The source guest is alive (its writes advance) and its memory is exactly what its model says. */
async function assertSourceIntact(guest: SourceGuest): Promise<void> {
  // (waited for, not timed: a loaded host may not run the guest within a fixed 100 ms)
  const w1 = await writesOf(guest);
  await until('the source guest keeps writing', async () => (await writesOf(guest)) > w1);
  const state = JSON.parse((await guest.pause()).toString()) as GuestState;
  const check = await verifyContent(guest.region, { content: 'mixed', seed: 1n, writes: BigInt(state.writes), span: state.span, sequential: false });
  await guest.resume();
  assert.deepEqual(check, { bad: 0, firstBad: -1 }, 'the source image matches the guest model');
}

// the stream is encrypted here (a pre-shared key): the records carry the live guest's pages
const psk = { kind: 'psk', identity: 'e2e', key: Buffer.alloc(32, 5) } as const;

test('a live migration over an encrypted stream arrives bit-identical and the guest continues its heartbeat and counters', async () => {
  const guest = await SourceGuest.spawn({ ...guestOpts, heartbeat: observer.address });
  let incoming: IncomingGuest | undefined;
  let sourceDigest = 0n;
  let destDigest = -1n;
  let pausedState: GuestState | undefined;
  const rx = await listen('127.0.0.1', 0, {
    credentials: psk,
    onReserved: async (region, plan, layout) => {
      incoming = await startReferenceIncoming(region, layout, plan);
    },
    activate: async (region, deviceState) => {
      destDigest = await imageDigest(region);
      await incoming!.activate(deviceState);
    },
  });
  try {
    await new Promise((r) => setTimeout(r, 200));
    const report = await migrate({
      region: guest.region,
      target: guest.target!,
      to: { host: '127.0.0.1', port: rx.port },
      pause: async () => {
        const s = await guest.pause();
        pausedState = JSON.parse(s.toString()) as GuestState;
        sourceDigest = await imageDigest(guest.region);
        return s;
      },
      resume: () => guest.resume(),
      commit: () => guest.commit(),
      release: () => guest.exit(),
      credentials: psk,
    });
    await rx.next();
    assert.equal(report.verified, true);
    assert.deepEqual([report.security.auth, report.security.encrypted], ['tls-psk', true]);
    assert.ok(report.rounds >= 1);
    assert.equal(destDigest, sourceDigest, 'destination image equals the source image at pause');
    assert.ok(BigInt(pausedState!.writes) > 0n, 'the guest was writing during the migration');
    const destPid = incoming!.child.pid!;
    // its check after activation, waited for by its beats however long a loaded host takes
    const verify = await guestCheck({ pid: destPid, beats: () => observer.beats });
    assert.deepEqual({ bad: verify.bad, writes: verify.writes }, { bad: 0, writes: pausedState!.writes });
    const sourceBeats = observer.beats.filter((b) => b.pid === guest.child.pid);
    const destBeats = observer.beats.filter((b) => b.pid === destPid);
    // the sequence continues from the state the source paused with. Its own beats are compared to
    // that state, not to the last one that arrived: the guest counts a beat before it sends it, and
    // the one counted last could be lost with the process, released, on a loaded host
    const nextSeq = pausedState!.heartbeatSeq; // the state holds the next beat's number
    assert.ok(
      sourceBeats.every((b) => b.seq < nextSeq),
      `the source beat no more after its pause (next ${nextSeq}; last seen ${Math.max(...sourceBeats.map((b) => b.seq))})`,
    );
    assert.equal(Math.min(...destBeats.map((b) => b.seq)), nextSeq, 'heartbeat sequence continues');
    const later = await observer.waitFor((b) => b.pid === destPid && BigInt(b.writes) > BigInt(pausedState!.writes), 10_000);
    assert.ok(later, 'the destination guest continues the write counter');
  } finally {
    incoming?.kill();
    if (guest.child.exitCode === null) guest.kill();
    await rx.close();
  }
});

test('the receiver killed in the middle of pre-copy leaves the source guest running and unchanged', async () => {
  const guest = await SourceGuest.spawn(guestOpts);
  const cli = path.join(here, '../src/cli/main.js');
  const receiver = spawn(process.execPath, [cli, 'receive', '--listen', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const first = await createInterface({ input: receiver.stdout! })[Symbol.asyncIterator]().next();
    const { port } = JSON.parse(first.value as string) as { port: number };
    let resumed = 0;
    await assert.rejects(
      migrate({
        region: guest.region,
        target: guest.target!,
        to: { host: '127.0.0.1', port },
        pause: () => guest.pause(),
        resume: async () => void resumed++,
        batchBytes: 256 * 1024,
        onProgress: (e) => {
          if (e.type === 'handshake') setTimeout(() => receiver.kill('SIGKILL'), 50);
        },
      }),
      (e: unknown) => e instanceof LivemigError && e.code === 'ERR_LIVEMIG_CONNECTION',
    );
    assert.equal(resumed, 0, 'the guest was never paused, so nothing to resume');
    await assertSourceIntact(guest);
  } finally {
    receiver.kill('SIGKILL');
    guest.kill();
  }
});

test('the connection cut during stop-and-copy resumes the guest on the source', async () => {
  const guest = await SourceGuest.spawn(guestOpts);
  let activated = false;
  const rx = await listen('127.0.0.1', 0, { activate: async () => void (activated = true) });
  const rxOutcome = rx.next().then(
    () => undefined,
    (e: unknown) => e as LivemigError,
  );
  const sockets: net.Socket[] = [];
  const proxy = net.createServer((client) => {
    const upstream = net.connect(rx.port, '127.0.0.1');
    sockets.push(client, upstream);
    client.pipe(upstream).pipe(client);
    client.on('error', () => undefined);
    upstream.on('error', () => undefined);
  });
  proxy.listen(0, '127.0.0.1');
  await once(proxy, 'listening');
  try {
    let resumed = 0;
    await assert.rejects(
      migrate({
        region: guest.region,
        target: guest.target!,
        to: { host: '127.0.0.1', port: (proxy.address() as net.AddressInfo).port },
        pause: async () => {
          const s = await guest.pause();
          for (const s2 of sockets) s2.destroy(); // the link goes down inside the pause
          return s;
        },
        resume: async () => {
          resumed++;
          await guest.resume();
        },
      }),
      (e: unknown) => e instanceof LivemigError && (e.code === 'ERR_LIVEMIG_CONNECTION' || e.code === 'ERR_LIVEMIG_TIMEOUT'),
    );
    assert.equal(resumed, 1, 'the guest was resumed on the source exactly once');
    assert.equal(activated, false, 'nothing activated on the destination');
    assert.ok((await rxOutcome) instanceof LivemigError, 'the receiver discarded its copy');
    await assertSourceIntact(guest);
  } finally {
    proxy.close();
    await rx.close();
    guest.kill();
  }
});

test('a device state the destination guest refuses fails the migration before commitment, and the source resumes', async () => {
  const guest = await SourceGuest.spawn(guestOpts);
  let incoming: IncomingGuest | undefined;
  let activated = false;
  const rx = await listen('127.0.0.1', 0, {
    onReserved: async (region, plan, layout) => {
      incoming = await startReferenceIncoming(region, layout, plan);
    },
    onDiscard: () => incoming?.kill(),
    prepare: (_region, deviceState) => incoming!.prepare(deviceState),
    activate: async () => void (activated = true),
  });
  const rxOutcome = rx.next().then(
    () => undefined,
    (e: unknown) => e as LivemigError,
  );
  try {
    let resumed = 0;
    await assert.rejects(
      migrate({
        region: guest.region,
        target: guest.target!,
        to: { host: '127.0.0.1', port: rx.port },
        // a state from some other guest: the destination's guest cannot load it
        pause: async () => {
          await guest.pause();
          return Buffer.from(JSON.stringify({ version: 7 }));
        },
        resume: async () => {
          resumed++;
          await guest.resume();
        },
        commit: () => guest.commit(),
        release: () => guest.exit(),
      }),
      (e: unknown) =>
        e instanceof LivemigError && e.code === 'ERR_LIVEMIG_REFUSED' && /ERR_LIVEMIG_GUEST: the incoming guest refused 'S'.*version 7/.test(e.message),
    );
    assert.equal(resumed, 1, 'the source guest was resumed once');
    assert.equal(activated, false, 'nothing was activated at the destination');
    const rxErr = await rxOutcome;
    assert.equal(rxErr?.code, 'ERR_LIVEMIG_GUEST');
    await assertSourceIntact(guest);
  } finally {
    incoming?.kill();
    guest.kill();
    await rx.close();
  }
});
