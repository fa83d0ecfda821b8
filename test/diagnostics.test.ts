/**
 * Observers subscribe to named diagnostics channels (src/trace.ts): a migration publishes its
 * steps on livemig:source and livemig:receiver as structured messages, in order, each event
 * named in the catalogue (src/trace-events.ts). The fault matrix fires its faults at some of
 * these steps (test/fixtures/fault-steps.ts): a migration in each mode must still emit every one.
 */
import assert from 'node:assert/strict';
import diagnostics_channel from 'node:diagnostics_channel';
import { test } from 'node:test';
import type { IncomingGuest } from '../src/guest/incoming-session.js';
import { listen } from '../src/receiver/listen.js';
import { Region } from '../src/region/region.js';
import { migrate } from '../src/source/migrate.js';
import { DIAGNOSTICS_CHANNEL_NAMES, trace, type TraceFamily } from '../src/trace.js';
import { ReceiverEvent, SourceEvent } from '../src/trace-events.js';
import { SourceGuest, startReferenceIncoming } from '../src/workload/controller.js';
import { isStep, STEP, type FaultStep, type Stage } from './fixtures/fault-steps.js';
import { minorFaultsReason } from './helpers.js';

interface Seen {
  family: TraceFamily;
  event: string;
  ms: number;
  data: Record<string, unknown>;
  message: unknown;
}

type Message = { event: string } & Record<string, unknown>;

/** Records every message of `families` until off(); `also` sees each as it is published. */
function record(families: TraceFamily[], also?: (family: TraceFamily, message: Message) => void): { seen: Seen[]; off(): void } {
  const seen: Seen[] = [];
  const subs = families.map((family) => {
    const fn = (message: unknown): void => {
      const { event, ms, ...data } = message as { event: string; ms: number };
      seen.push({ family, event, ms, data, message });
      also?.(family, message as Message);
    };
    diagnostics_channel.subscribe(DIAGNOSTICS_CHANNEL_NAMES[family], fn);
    return () => diagnostics_channel.unsubscribe(DIAGNOSTICS_CHANNEL_NAMES[family], fn);
  });
  return { seen, off: () => subs.forEach((off) => off()) };
}

/** The matrix's steps of `stages`, each named `stage × side`, that no message in `seen` is. */
function missingSteps(stages: Stage[], seen: Seen[]): string[] {
  const steps = stages.flatMap((stage) => Object.entries(STEP[stage]).map(([side, step]): [string, FaultStep] => [`${stage} × ${side}`, step]));
  const emitted = (step: FaultStep): boolean => seen.some((s) => s.family === step.family && isStep(step, s.message));
  return steps.filter(([, step]) => !emitted(step)).map(([name, step]) => `${name}: ${step.event}${step.round !== undefined ? ` (round ${step.round})` : ''}`);
}

// The matrix runs its post-copy stage with --mode postcopy and every other one in pre-copy.
const POSTCOPY_STAGES: Stage[] = ['post-copy'];
const PRECOPY_STAGES = (Object.keys(STEP) as Stage[]).filter((s) => !POSTCOPY_STAGES.includes(s));

test('a migration publishes its hand-over steps on livemig:source and livemig:receiver, and the encoder its rounds on livemig:chooser', async () => {
  const rec = record(['source', 'receiver', 'chooser']);
  const region = Region.create(256 * 4096, { name: 'diag-src' });
  region.view().fill(3);
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined });
  try {
    const report = await migrate({ region, to: { host: '127.0.0.1', port: rx.port }, pause: async () => new Uint8Array(4), resume: async () => undefined });
    await rx.next();
    assert.equal(report.verified, true);
  } finally {
    rec.off();
    await rx.close();
    region.release();
  }
  const { seen } = rec;
  const source = seen.filter((s) => s.family === 'source').map((s) => s.event);
  const order = [SourceEvent.pauseRequested, SourceEvent.guestPaused, SourceEvent.finalCollectDone, SourceEvent.lastPagesSent, SourceEvent.activatedReceived];
  const at = order.map((e) => source.indexOf(e));
  assert.ok(
    at.every((i) => i >= 0),
    `every step published: ${source.join(', ')}`,
  );
  assert.deepEqual(
    [...at].sort((a, b) => a - b),
    at,
    'in order',
  );
  const commit = seen.find((s) => s.event === SourceEvent.commitSent);
  assert.equal(typeof commit?.data['pages'], 'number', 'a step carries its figures as fields');
  assert.ok(
    seen.some((s) => s.family === 'receiver' && s.event === ReceiverEvent.guestActivated),
    'the receiver publishes its own steps',
  );
  const rounds = seen.filter((s) => s.family === 'chooser');
  const accounted = rounds.every((r) => typeof r.data['round'] === 'number' && typeof r.data['raw_pages'] === 'number');
  assert.ok(rounds.length > 0 && accounted, 'the encoder publishes per-round accounting');
});

test('a pre-copy migration emits every step the fault matrix waits for, in the rounds it waits for', async () => {
  const region = Region.create(1024 * 4096, { name: 'diag-steps' });
  region.view().fill(5);
  // A page written while a round goes out is due again in the next: with pages of the first
  // stripe (the main connection's, where the receiver traces a round) written as each round
  // begins, rounds 2 and 3 carry pages, as the matrix's writing guest makes them do.
  const rec = record(['source', 'receiver'], (family, m) => {
    if (family === 'source' && m.event === SourceEvent.roundBegins) region.view().fill(16 + Number(m['round']), 0, 8 * 4096);
  });
  const rx = await listen('127.0.0.1', 0, { activate: async () => undefined });
  try {
    // a limit no estimate fits and no stall to stop on: exactly maxRounds rounds, on any machine
    const report = await migrate({
      region,
      to: { host: '127.0.0.1', port: rx.port },
      pause: async () => new Uint8Array(4),
      resume: async () => undefined,
      downtimeLimitMs: 0.001,
      maxRounds: 3,
      onStall: 'force',
      wws: false,
    });
    await rx.next();
    assert.equal(report.verified, true);
  } finally {
    rec.off();
    await rx.close();
    region.release();
  }
  assert.deepEqual(missingSteps(PRECOPY_STAGES, rec.seen), [], `steps seen: ${rec.seen.map((s) => `${s.family}: ${s.event}`).join(', ')}`);
});

const noPostcopy = minorFaultsReason();
if (noPostcopy) console.log(`# skipping the post-copy steps: ${noPostcopy}`);

test('a post-copy migration of the reference guest emits every step the fault matrix waits for in post-copy', { skip: noPostcopy }, async () => {
  let incoming: IncomingGuest | undefined;
  const rx = await listen('127.0.0.1', 0, {
    onReserved: async (region, plan, layout) => {
      incoming = await startReferenceIncoming(region, layout, plan);
    },
    onDiscard: () => incoming?.kill(),
    postcopy: { register: () => incoming!.register() },
    activate: async (_r, ds) => incoming!.activate(ds),
  });
  const g = await SourceGuest.spawn({ size: 8 << 20, content: 'mixed', rate: 0, pattern: 'uniform' });
  const rec = record(['source', 'receiver']);
  try {
    const received = rx.next();
    received.catch(() => undefined);
    const report = await migrate({
      region: g.region,
      ...(g.target ? { target: g.target } : {}),
      to: { host: '127.0.0.1', port: rx.port },
      pause: () => g.pause(),
      resume: () => g.resume(),
      commit: () => g.commit(),
      release: () => g.exit(),
      mode: 'postcopy',
    });
    assert.equal(report.mode, 'postcopy');
    assert.equal((await received).mode, 'postcopy');
  } finally {
    rec.off();
    g.kill();
    incoming?.kill();
    await rx.close();
  }
  assert.deepEqual(missingSteps(POSTCOPY_STAGES, rec.seen), [], `steps seen: ${rec.seen.map((s) => `${s.family}: ${s.event}`).join(', ')}`);
});

// Never called: tsc holds that trace() takes only its family's events, each with its payload.
// Each line compiled while events were free text; if one compiles again, tsc reports an unused
// directive and the build fails.
const mustNotCompile = (): void => {
  // @ts-expect-error a misspelt event
  trace('source', 'HELO sent');
  // @ts-expect-error an event of another family
  trace('source', ReceiverEvent.reserving, { bytes: 1 });
  // @ts-expect-error a payload missing
  trace('source', SourceEvent.roundBegins);
  // @ts-expect-error a field of the wrong type
  trace('source', SourceEvent.roundBegins, { round: '1' });
  // @ts-expect-error a field the payload does not have
  trace('source', SourceEvent.roundBegins, { round: 1, pages: 2 });
  // @ts-expect-error a payload on an event that has none
  trace('source', SourceEvent.connected, { round: 1 });
};
void mustNotCompile;
