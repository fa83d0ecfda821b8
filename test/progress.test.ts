/**
 * Progress that tells the truth: the model (share of the known work done, never backwards,
 * moving while bytes move, 100 only at completion), the terminal's line (in place on a TTY,
 * plain lines on a pipe), and through two daemons: a throttled pre-copy migration's samples,
 * a post-copy migration's pages left, and the per-migration gauges of /metrics.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, describe, test } from 'node:test';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { ProgressBar, progressText, type ShownProgress } from '../src/cli/progress-bar.js';
import type { ApiTarget } from '../src/daemon/client.js';
import { Daemon } from '../src/daemon/daemon.js';
import type { DaemonEvent } from '../src/daemon/events.js';
import { Progress, type ProgressSample, type ProgressView } from '../src/daemon/progress.js';
import { probe } from '../src/tracking/probe.js';
import { referenceIncomingCommand } from '../src/workload/controller.js';
import { call, Pids, registerGuest, settled } from './daemon-helpers.js';
import { until } from './helpers.js';

const MiB = 1 << 20;

const sample = (o: Partial<ProgressSample> & { at: number; movedBytes: number; remainingBytes: number }): ProgressSample => ({
  stage: 'precopy',
  wireBytes: o.movedBytes,
  ...o,
});

describe('the progress model', () => {
  test('a first pass without writes is linear, and nothing left is 99.9 until completion', () => {
    const p = new Progress(1000, 0);
    assert.equal(p.update(sample({ at: 0, movedBytes: 0, remainingBytes: 1000 })).percent, 0);
    assert.equal(p.update(sample({ at: 250, movedBytes: 250, remainingBytes: 750 })).percent, 25);
    assert.equal(p.update(sample({ at: 500, movedBytes: 500, remainingBytes: 500 })).percent, 50);
    const last = p.update(sample({ at: 1000, movedBytes: 1000, remainingBytes: 0 }));
    assert.equal(last.percent, 99.9, 'the stop is ahead');
    assert.deepEqual([last.elapsed_ms, last.transferred_bytes, last.remaining_bytes], [1000, 1000, 0]);
    assert.equal(last.throughput_bytes_per_s, 1000, 'region bytes over the last second of samples');
    const done = p.complete();
    assert.deepEqual([done.percent, done.eta_s, done.remaining_bytes], [100, 0, 0]);
  });

  test("the guest's writes this round are a reserve: the first pass does not claim what its end will ask again", () => {
    const p = new Progress(1000, 0);
    p.update(sample({ at: 0, movedBytes: 0, remainingBytes: 1000, dirtyBytes: 0, dirtyBytesPerS: 100 }));
    const mid = p.update(sample({ at: 1000, movedBytes: 500, remainingBytes: 500, dirtyBytes: 50, dirtyBytesPerS: 100 }));
    // 500 B/s: 1 s to the round's end, 100 more bytes written by then; 500 / (500 + 500 + 150)
    assert.equal(mid.percent, 43.47);
    const end = p.update(sample({ at: 2000, movedBytes: 1000, remainingBytes: 0, dirtyBytes: 100, dirtyBytesPerS: 100 }));
    assert.equal(end.percent, 90.9, 'the pass is done; 100 bytes are known to go again');
    assert.equal(end.dirty_bytes_per_s, 100);
    // the round ends with those 100 bytes due: where the reserve said, no step back
    const next = p.update(sample({ at: 2050, movedBytes: 1000, remainingBytes: 100, dirtyBytes: 0, dirtyBytesPerS: 100 }));
    assert.equal(next.percent, 90.9);
    assert.equal(next.remaining_bytes, 100);
  });

  test('a round that finds more than foreseen never lowers the percentage, and it moves again with the next bytes', () => {
    const p = new Progress(1000, 0);
    p.update(sample({ at: 0, movedBytes: 0, remainingBytes: 1000 }));
    const high = p.update(sample({ at: 1000, movedBytes: 990, remainingBytes: 10 })).percent;
    const after = p.update(sample({ at: 1100, movedBytes: 1000, remainingBytes: 400 })).percent;
    assert.ok(after >= high, `${after} >= ${high}`);
    let last = after;
    for (let k = 1; k <= 8; k++) {
      const v = p.update(sample({ at: 1100 + 250 * k, movedBytes: 1000 + 50 * k, remainingBytes: 400 - 50 * k }));
      assert.ok(v.percent > last, `bytes moved (${v.transferred_bytes}): ${v.percent} > ${last}`);
      last = v.percent;
    }
    assert.equal(last, 99.9, 'all of it sent: at the ceiling, not at 100');
    const stale = p.update(sample({ at: 3500, movedBytes: 10, remainingBytes: 0 }));
    assert.equal(stale.transferred_bytes, 1400, 'an older reading does not take counters back');
  });

  test('the ETA nets out the dirty rate, and there is none while the guest writes about as fast as pages go', () => {
    const p = new Progress(10_000, 0);
    p.update(sample({ at: 0, movedBytes: 0, remainingBytes: 10_000, dirtyBytes: 0, dirtyBytesPerS: 200 }));
    const v = p.update(sample({ at: 1000, movedBytes: 1000, remainingBytes: 4000, dirtyBytes: 0, dirtyBytesPerS: 200 }));
    // 1000 B/s less 200 B/s written; 4000 due and 800 written by the round's end
    assert.equal(v.eta_s, +(4800 / 800 + 0.008).toFixed(2));
    const q = new Progress(10_000, 0);
    q.update(sample({ at: 0, movedBytes: 0, remainingBytes: 10_000, dirtyBytesPerS: 950 }));
    assert.equal(q.update(sample({ at: 1000, movedBytes: 1000, remainingBytes: 9000, dirtyBytesPerS: 950 })).eta_s, undefined);
    const r = new Progress(10_000, 0);
    assert.equal(r.update(sample({ at: 0, movedBytes: 0, remainingBytes: 10_000 })).eta_s, undefined, 'no rate measured yet');
  });

  test("post-copy: the pages left are the remaining bytes, no dirty rate; completion's pages left are 0", () => {
    const p = new Progress(4096 * 100, 0);
    const pc = { pages_needed: 100, pages_left: 40, pages_pushed: 55, pages_served: 5, faults: 5 };
    const v = p.update({ at: 500, stage: 'postcopy', movedBytes: 60 * 4096, remainingBytes: 40 * 4096, wireBytes: 60 * 4096, dirtyBytesPerS: 5, postcopy: pc });
    assert.deepEqual([v.percent, v.dirty_bytes_per_s, v.postcopy?.pages_left], [60, undefined, 40]);
    assert.equal(p.complete().postcopy?.pages_left, 0);
  });
});

/** A stream that collects what is written to it, as a terminal (isTTY) or a pipe. */
function fakeStream(tty: boolean, columns?: number): { stream: NodeJS.WriteStream; writes: string[] } {
  const writes: string[] = [];
  const stream = {
    isTTY: tty,
    columns,
    write(s: string) {
      writes.push(s);
      return true;
    },
  } as unknown as NodeJS.WriteStream;
  return { stream, writes };
}

describe('the progress line', () => {
  const shown = (percent: number, remaining: number): ShownProgress => ({
    percent,
    remaining_bytes: remaining * MiB,
    total_bytes: 512 * MiB,
    transferred_bytes: (512 - remaining) * MiB,
    wire_bytes: 200 * MiB,
    throughput_bytes_per_s: 40e6,
    dirty_bytes_per_s: 3.2e6,
    expected_downtime_ms: 12,
    eta_s: 4.2,
    stage: 'precopy',
  });

  test('says region bytes left of the whole, and wire bytes apart', () => {
    const t = progressText(shown(62.3, 190));
    for (const part of [
      '62.3%',
      '190 of 512 MiB left',
      '322 MiB sent (200 MiB on the wire)',
      '40.0 MB/s',
      'dirty 3.2 MB/s',
      'downtime ~12 ms',
      'ETA 4.2 s',
      '(precopy)',
    ])
      assert.ok(t.includes(part), `${JSON.stringify(t)} has ${part}`);
    const pc = progressText({ percent: 99, postcopy: { pages_left: 12, pages_pushed: 900, pages_served: 30, faults: 25 } });
    assert.ok(pc.includes('12 pages left, 900 pushed, 25 faults served'), pc);
  });

  test('on a TTY: one line redrawn in place, cut to the width, lines above it, a newline at the end', () => {
    const { stream, writes } = fakeStream(true, 60);
    const bar = new ProgressBar(stream, { redrawMs: 0 });
    bar.show(shown(10, 460));
    bar.show(shown(20, 410));
    for (const w of writes) {
      assert.ok(w.startsWith('\r') && w.endsWith('\x1b[K') && !w.includes('\n'), JSON.stringify(w));
      assert.ok(w.length - '\r\x1b[K'.length <= 59, `cut to the width: ${w.length}`);
    }
    assert.equal(writes.length, 2);
    assert.ok(writes[1]!.includes(' 20.0%'));
    bar.show(shown(20, 410));
    assert.equal(writes.length, 2, 'the same line is not drawn again');
    bar.line('round 1: ...');
    assert.equal(writes[2], '\r\x1b[Kround 1: ...\n', 'the bar is cleared, the line printed');
    assert.ok(writes[3]!.startsWith('\r[') && writes[3]!.includes(' 20.0%'), 'and the bar redrawn below it');
    bar.end();
    assert.equal(writes.at(-1), '\n');
  });

  test('on a pipe: a plain line per sample, no escape codes', () => {
    const { stream, writes } = fakeStream(false);
    const bar = new ProgressBar(stream);
    bar.show(shown(10, 460));
    bar.show(shown(20, 410));
    bar.line('state completed');
    bar.end();
    assert.equal(writes.length, 3);
    assert.ok(writes[0]!.startsWith('progress  10.0%') && writes[1]!.startsWith('progress  20.0%'));
    for (const w of writes) assert.ok(w.endsWith('\n') && !w.includes('\x1b') && !w.includes('\r'), JSON.stringify(w));
  });
});

const uffd = probe().find((p) => p.backend === 'uffd-async')!;
const skip = uffd.available ? false : uffd.reason;
const dirs: string[] = [];
const pids = new Pids();

async function inProcess(tag: string): Promise<{ daemon: Daemon; api: ApiTarget }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), `livemig-progress-${tag}-`));
  dirs.push(dir);
  const daemon = await Daemon.start({
    api: { path: path.join(dir, 'api.sock') },
    listen: { host: '127.0.0.1', port: 0 },
    guests: path.join(dir, 'guests.sock'),
    guestCommand: referenceIncomingCommand(),
  });
  return { daemon, api: { socketPath: path.join(dir, 'api.sock') } };
}

async function metrics(api: ApiTarget): Promise<ReturnType<typeof parsePrometheusTextFormat>> {
  const text = await new Promise<string>((resolve, reject) => {
    http
      .get({ socketPath: (api as { socketPath: string }).socketPath, path: '/metrics' }, (res) => {
        let s = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (s += c));
        res.on('end', () => resolve(s));
      })
      .on('error', reject);
  });
  return parsePrometheusTextFormat(text);
}

/** The gauges that have a series of migration `id`. */
function gaugesOf(families: ReturnType<typeof parsePrometheusTextFormat>, id: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const f of families)
    for (const m of f.metrics as unknown as { labels?: Record<string, string>; value?: string }[])
      if (m.labels?.['migration'] === id && f.name.startsWith('livemig_migration_')) out.set(f.name, Number(m.value));
  return out;
}

describe('progress through the daemon', { skip }, () => {
  let a: { daemon: Daemon; api: ApiTarget };
  let b: { daemon: Daemon; api: ApiTarget };
  const events: DaemonEvent[] = [];
  let unsubscribe: () => void;
  before(async () => {
    a = await inProcess('a');
    b = await inProcess('b');
    unsubscribe = a.daemon.bus.subscribe((e) => void events.push(e));
  });
  afterEach(() => pids.killAll());
  after(async () => {
    unsubscribe();
    for (const m of b.daemon.table.list()) {
      const pid = Number(b.daemon.extra(m)['guest_pid'] ?? 0);
      if (pid > 0) pids.push(pid);
    }
    pids.killAll();
    await a.daemon.shutdown();
    await b.daemon.shutdown();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  const progressOf = (id: string): (ProgressView & { stage: string; id: number })[] =>
    events.filter((e) => e.migration === id && e.type === 'progress').map((e) => ({ ...(e.data as unknown as ProgressView & { stage: string }), id: e.id }));

  test('a throttled pre-copy migration: samples never go back, never stall while bytes move, and carry rates before the first round ends', async () => {
    const g = await registerGuest(a.api, a.daemon.registry.path, 'throttled', { size: 24 * MiB, rate: 2 });
    pids.push(g.pid);
    // 6 MiB/s of raw pages: the first pass alone takes about 4 s, samples every 250 ms
    const c = await call(a.api, 'POST', '/v1/migrations', {
      guest: 'throttled',
      to: { host: '127.0.0.1', port: b.daemon.migrationPort },
      bandwidth_mib_s: 6,
      encodings: false,
      downtime_limit_ms: 500,
    });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    const id = String(c.body['id']);
    // the rates need two looks at the guest's writes: waited for, then the gauges are read
    await until(
      'a sample past a tenth, with its rates',
      () => progressOf(id).some((p) => p.stage === 'precopy' && p.percent > 10 && p.dirty_bytes_per_s !== undefined && p.expected_downtime_ms !== undefined),
      120_000,
    );
    const running = gaugesOf(await metrics(a.api), id);
    for (const name of [
      'livemig_migration_progress_percent',
      'livemig_migration_remaining_bytes',
      'livemig_migration_transferred_bytes',
      'livemig_migration_wire_bytes',
      'livemig_migration_throughput_bytes_per_second',
      'livemig_migration_dirty_rate_bytes_per_second',
      'livemig_migration_expected_downtime_seconds',
    ])
      assert.ok(running.has(name), `${name} has a series for the running migration: ${JSON.stringify([...running])}`);
    assert.ok(running.get('livemig_migration_remaining_bytes')! > 0 && running.get('livemig_migration_transferred_bytes')! > 0);
    const view = await settled(a.api, id);
    assert.equal(view['state'], 'completed', JSON.stringify(view['error']));
    const after = gaugesOf(await metrics(a.api), id);
    assert.equal(after.size, 0, `an ended migration has no gauges: ${JSON.stringify([...after])}`);

    const samples = progressOf(id);
    const summary = samples.map((s) => `${s.elapsed_ms}:${s.percent}:${s.transferred_bytes}`).join(' ');
    assert.ok(samples.length >= 8, `samples: ${summary}`);
    for (let i = 1; i < samples.length; i++) assert.ok(samples[i]!.percent >= samples[i - 1]!.percent, `never backwards: ${summary}`);
    assert.equal(samples.at(-1)!.percent, 100);
    // while pre-copy moves bytes, the percentage moves within a second (by the samples' own times)
    const pre = samples.filter((s) => s.stage === 'precopy');
    let since = pre[0]!;
    for (const s of pre) {
      if (s.percent !== since.percent) since = s;
      else if (s.transferred_bytes > since.transferred_bytes)
        assert.ok(
          s.elapsed_ms - since.elapsed_ms <= 1000,
          `unchanged at ${s.percent}% from ${since.elapsed_ms} to ${s.elapsed_ms} ms while bytes moved: ${summary}`,
        );
    }
    const firstRound = events.find((e) => e.migration === id && e.type === 'round')!;
    assert.ok(firstRound, 'a round ended');
    const early = pre.filter((s) => s.id < firstRound.id);
    const live = early.filter((s) => s.throughput_bytes_per_s !== undefined && s.dirty_bytes_per_s !== undefined && s.expected_downtime_ms !== undefined);
    assert.ok(live.length >= 3, `throughput, dirty rate and expected downtime before the first round's end: ${JSON.stringify(early.slice(0, 4))}`);
    assert.ok(
      live.some((s) => s.throughput_bytes_per_s! > 0),
      'the throughput is measured',
    );
    for (const s of samples) assert.ok(s.remaining_bytes <= s.total_bytes && s.total_bytes === 24 * MiB, 'region bytes, not wire bytes');
  });

  test("a post-copy migration's samples show its pages left falling to 0, and its gauge while it runs", async () => {
    const g = await registerGuest(a.api, a.daemon.registry.path, 'postcopied', { size: 24 * MiB, rate: 2 });
    pids.push(g.pid);
    const c = await call(a.api, 'POST', '/v1/migrations', {
      guest: 'postcopied',
      to: { host: '127.0.0.1', port: b.daemon.migrationPort },
      mode: 'postcopy',
      postcopy_bandwidth_mib_s: 6, // post-copy's push has its own cap (none by default)
      encodings: false,
    });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    const id = String(c.body['id']);
    await until('a post-copy sample', () => progressOf(id).some((p) => (p.postcopy?.pages_left ?? 0) > 0), 120_000);
    const running = gaugesOf(await metrics(a.api), id);
    assert.ok((running.get('livemig_migration_postcopy_pages_left') ?? 0) > 0, `pages left while it runs: ${JSON.stringify([...running])}`);
    const view = await settled(a.api, id);
    assert.equal(view['state'], 'completed', JSON.stringify(view['error']));
    const left = progressOf(id)
      .filter((s) => s.postcopy !== undefined && s.percent < 100)
      .map((s) => s.postcopy!.pages_left);
    assert.ok(left.length >= 3 && left[0]! > 0, `pages left: ${left.join(',')}`);
    for (let i = 1; i < left.length; i++) assert.ok(left[i]! <= left[i - 1]!, `pages left only fall: ${left.join(',')}`);
    assert.equal(left.at(-1), 0, `a sample before completion shows none left: ${left.join(',')}`);
    const pc = progressOf(id).find((s) => s.postcopy && s.postcopy.pages_pushed > 0)!.postcopy!;
    assert.equal(pc.pages_needed, (24 * MiB) / 4096);
  });
});
