/**
 * The reference guest (entry: guest.ts, which switches on eager compilation first): a process
 * that owns a memfd region with docs/CONTENT.md's content and writes to it at a given rate, emitting
 * one heartbeat per millisecond (UDP, to an observer). It follows the guest contract
 * (docs/GUEST.md) through the C library every guest may use (native/guest/), which answers
 * livemig on a thread of its own.
 *
 * Source mode (default): creates and fills its region, registers its own mapping for
 * write-protect tracking (unless --no-track), and serves livemig at --socket.
 * Incoming mode (--incoming): serves at --socket until livemig connects and hands it its
 * region; see the incoming branch below. Once told to run it verifies every page against its
 * model (heartbeats go on meanwhile; writes wait), reports the result, then continues writing
 * where the source stopped. With --disk the guest has a disk as well (native/guest/example/
 * example_disk.h), written with random 4 KiB blocks at --disk-rate MB/s and checked block by
 * block at the destination with the memory. With --register (a daemon's destination guest) it then registers
 * with that daemon as --name, tracked as at its source: it can be migrated onward, or back.
 */
import { trace } from '../trace.js';
import { GuestEvent } from '../trace-events.js';
import { defaultSlices } from '../sched.js';
import dgram from 'node:dgram';
import { monotonicMs } from './clock.js';
import { parseArgs } from 'node:util';
import { addon } from '../native.js';
import { guestAddon, type GuestMemory } from './guest-addon.js';
import { Region } from '../region/region.js';
import { checkHugePages } from '../region/huge-pages.js';
import { protectOwnRegion } from '../tracking/uffd-async.js';
import { fillContent, initialWriteState, verifyContent, type ContentName, type PatternName } from './content.js';
import { parseGuestState, type GuestState } from './state.js';

const { values } = parseArgs({
  options: {
    socket: { type: 'string' },
    /** register with a `livemig serve` daemon at this path (instead of listening at --socket; incoming: once it runs) */
    register: { type: 'string' },
    name: { type: 'string', default: 'reference-guest' },
    size: { type: 'string', default: String(1 << 30) },
    content: { type: 'string', default: 'mixed' },
    seed: { type: 'string', default: '1' },
    rate: { type: 'string', default: '64' },
    pattern: { type: 'string', default: 'uniform' },
    'hot-size': { type: 'string', default: String(64 << 20) },
    heartbeat: { type: 'string' },
    /** ms between ticks and beats: 1 (default) for guests whose gaps are measured, more to spare the CPU */
    'beat-ms': { type: 'string', default: '1' },
    incoming: { type: 'boolean', default: false },
    'no-track': { type: 'boolean', default: false },
    /** its memory's backing: none (4 KiB shmem), thp (shmem advised MADV_HUGEPAGE), hugetlb (2 MiB hugetlbfs pages) */
    'huge-pages': { type: 'string', default: 'none' },
    /** a disk image created here (bytes: --disk-size), written at --disk-rate MB/s of random 4 KiB blocks */
    disk: { type: 'string' },
    'disk-size': { type: 'string' },
    'disk-rate': { type: 'string', default: '0' },
    /** the disk's writes are not reported to livemig: it finds them itself (reflink or hash) */
    'no-disk-track': { type: 'boolean', default: false },
    /** print {guest: {socket, pid, bytes}} once serving (the `livemig guest` command) */
    announce: { type: 'boolean', default: false },
  },
});
if (!values.socket && !values.register) throw new Error('the reference guest needs --socket PATH or --register PATH');

// A guest runs with the host's default scheduling, like a VM's vCPU threads: it must not
// inherit the short slices of the livemig process that started it (src/sched.ts).
defaultSlices();
// The heartbeat socket is bound, and its send path run once (a datagram to itself), before the
// guest can be activated: Node compiles its own code on first use, which took milliseconds of
// the first beat after a hand-over.
performance.now(); // a lazily loaded global: its first use loads perf_hooks
const udp = dgram.createSocket('udp4');
await new Promise<void>((resolve) => udp.bind(0, () => resolve()));
await new Promise<void>((resolve) => udp.send(Buffer.alloc(0), udp.address().port, '127.0.0.1', () => resolve()));

/** the guest's memory: its address and size in this process (no Buffer over it: docs/HANDOVER.md) */
let region: GuestMemory;
let state: GuestState;
/** post-copy: run at once (faulting pages in as it touches them), verify when livemig says all arrived */
let postcopyGuest = false;
/** run state {write-stream xorshift, writes, heartbeat seq}: native code reads it at a pause */
const st = new BigUint64Array(3);
let incoming: { handle: unknown } | undefined;
/** where the memory is in its memfd (the library's descriptor): what a hello to livemig hands over */
let memoryFile: { fd: number; offset: number } | undefined;

if (values.incoming) {
  // Started on the destination during pre-copy: livemig connects, hands over the region (mapped
  // and populated here, unless post-copy is planned) and later the state ('S', checked and
  // loaded before the source commits), then says run ('G'), which starts the guest within
  // microseconds: the main thread waits inside the library until then, with no event loop in
  // between. livemig going away first: there is no guest to run here.
  const opened = guestAddon.incomingOpen(values.socket!, 120_000);
  if (opened.regions.length !== 1 || opened.disks.length > 1) {
    console.error(`the reference guest has one region and at most one disk; livemig handed over ${opened.regions.length} and ${opened.disks.length}`);
    process.exit(1);
  }
  const handedDisk = opened.disks[0];
  incoming = opened;
  const early = opened.regions[0]!;
  trace('guest', GuestEvent.incomingMapped);
  // the state check runs once now, not for the first time inside the hand-over
  parseGuestState(
    Buffer.from(
      JSON.stringify({
        version: 1,
        size: early.size,
        content: 'zero',
        seed: '1',
        pattern: 'uniform',
        span: 1,
        rate: 0,
        xs: '1',
        writes: '0',
        heartbeatSeq: 0,
        throttle: 0,
      } satisfies GuestState),
    ),
  );
  // while it only waits to be told to go, the main thread answers at once (a short slice, as
  // the control thread has); running, it is a vCPU with the default slice again
  addon.setThreadSlice(100_000);
  let loaded: GuestState | undefined;
  const run = guestAddon.incomingWait(opened.handle, (body) => {
    try {
      const s = parseGuestState(body);
      if (s.size !== early.size) return `state is for ${s.size} bytes, region has ${early.size}`;
      if (s.disk?.size !== handedDisk?.size) return `state is for a disk of ${s.disk?.size ?? 0} bytes, livemig handed over ${handedDisk?.size ?? 0}`;
      loaded = s;
      return undefined;
    } catch (e) {
      return (e as Error).message.slice(0, 400);
    }
  });
  addon.setThreadSlice(0);
  if (!run || !loaded) process.exit(0);
  trace('guest', GuestEvent.incomingRunning);
  region = early;
  memoryFile = { fd: early.fd, offset: early.offset };
  state = loaded;
  postcopyGuest = guestAddon.incomingStatus(opened.handle).postcopy;
  st[0] = BigInt(state.xs);
  st[1] = BigInt(state.writes);
  st[2] = BigInt(state.heartbeatSeq);
  if (state.disk && handedDisk)
    guestAddon.diskAdopt(handedDisk.fd, handedDisk.size, handedDisk.name, BigInt(state.seed), BigInt(state.diskXs!), BigInt(state.diskWrites!));
} else {
  const size = Number(values.size);
  const pattern = values.pattern as PatternName;
  const pages = size / 4096;
  const span = pattern === 'hot' ? Math.max(1, Math.min(pages, Math.floor(Number(values['hot-size']) / 4096))) : pages;
  // every page allocated up front, but for `sparse`, whose untouched pages stay holes
  const created = Region.create(size, {
    name: 'livemig-guest',
    reserve: values.content !== 'sparse',
    hugePages: checkHugePages(values['huge-pages'], '--huge-pages'),
  });
  region = created;
  memoryFile = { fd: created.fd, offset: 0 };
  await fillContent(region, values.content as ContentName, BigInt(values.seed));
  const init = initialWriteState(BigInt(values.seed));
  st.set(init);
  state = {
    version: 1,
    size,
    content: values.content as ContentName,
    seed: values.seed,
    pattern,
    span,
    rate: Number(values.rate),
    xs: '0',
    writes: '0',
    heartbeatSeq: 0,
    ...(values.heartbeat ? { heartbeat: values.heartbeat } : {}),
    ...(Number(values['beat-ms']) !== 1 ? { beatMs: Number(values['beat-ms']) } : {}),
    throttle: 0,
  };
  if (values.disk !== undefined || values['disk-size'] !== undefined) {
    if (values.disk === undefined || values['disk-size'] === undefined) throw new Error('--disk PATH and --disk-size BYTES go together');
    const diskSize = Number(values['disk-size']);
    guestAddon.diskCreate(values.disk, diskSize, BigInt(values.seed), !values['no-disk-track']);
    state.disk = { size: diskSize, rate: Number(values['disk-rate']) };
    state.diskXs = guestAddon.diskState().xs.toString();
    state.diskWrites = '0';
  }
  // the destination takes the state as it comes: it must pass the destination's own check
  parseGuestState(Buffer.from(JSON.stringify(state)));
}

// --- heartbeat: one UDP datagram per tick (a millisecond unless --beat-ms says otherwise): {seq, writes, pid, t}; t is the guest's own
// CLOCK_MONOTONIC (shared by every process on the host) when it sent the beat, in ms
const [hbHost, hbPort] = state.heartbeat ? [state.heartbeat.split(':')[0]!, Number(state.heartbeat.split(':')[1])] : [undefined, 0];
let sentBeat = false;
/** a check's result rides on the beats of the next 3 s: datagrams are dropped when many guests beat into one busy observer */
const beatMs = state.beatMs ?? 1;
const VERIFY_REPEATS = Math.ceil(3000 / beatMs);
let lastVerify: object | undefined;
let verifyRepeats = 0;
function heartbeat(extra?: { verify?: object }): void {
  if (!hbHost) return;
  const seq = guestAddon.gateBeat(st);
  if (seq < 0) return; // paused: the guest is not running here
  if (extra?.verify) {
    lastVerify = extra.verify;
    verifyRepeats = VERIFY_REPEATS;
  } else if (verifyRepeats > 0) {
    verifyRepeats--;
    extra = { verify: lastVerify! };
  }
  const msg = Buffer.from(JSON.stringify({ seq, writes: st[1]!.toString(), pid: process.pid, t: monotonicMs(), ...extra }));
  if (!sentBeat) trace('guest', GuestEvent.firstBeat, { seq });
  sentBeat = true;
  udp.send(msg, hbPort, hbHost);
}

// --- writes: rate MiB/s x 256 writes per second, a tick's worth at a time; a backlog over 10 ms
// (or two ticks) is dropped
let running = false;
let writing = true;
let timer: NodeJS.Timeout | undefined;
let scheduleStart = 0;
let scheduled = 0;
let lastBeat = 0;
let lastTick = 0;
let wasPaused = false;
let lastThrottle = 0;
/** disk writes made since scheduleStart */
let diskScheduled = 0;
function tick(): void {
  if (!running) return;
  const t = performance.now();
  if (guestAddon.gatePaused()) {
    // paused through the control socket, whose thread does not reach this loop: idle lightly
    wasPaused = true;
    lastTick = 0;
    timer = setTimeout(tick, 5);
    return;
  }
  if (wasPaused) {
    wasPaused = false;
    scheduleStart = t; // resumed: no burst to catch up the paused time
    scheduled = 0;
    diskScheduled = 0;
  }
  if (t - lastTick > beatMs + 2 && lastTick > 0) trace('guest', GuestEvent.lateTick, { ms_since_last: +(t - lastTick).toFixed(1) });
  lastTick = t;
  if (writing && state.rate > 0) {
    const throttle = guestAddon.gateThrottle();
    if (throttle !== lastThrottle) {
      // the schedule starts again at the new rate: measured from the old start, a lower rate
      // left the guest seconds "ahead" of it, and a throttle of 20% stopped its writes for
      // a quarter of the time it had run (19 pages where a 30 ms round should see ~390)
      lastThrottle = throttle;
      scheduleStart = t;
      scheduled = 0;
      diskScheduled = 0;
    }
    const perMs = (state.rate * 256 * (1 - throttle / 100)) / 1000;
    let due = Math.floor((t - scheduleStart) * perMs) - scheduled;
    if (due > perMs * Math.max(10, 2 * beatMs)) {
      // fell more than 10 ms behind: drop the backlog, never burst to catch up
      scheduled += due - Math.ceil(perMs);
      due = Math.ceil(perMs);
    }
    if (due > 0) {
      guestAddon.guestWrite(region.address, region.size, st, due, state.span, state.pattern === 'sequential');
      scheduled += due;
    }
  }
  if (writing && state.disk && state.disk.rate > 0) {
    const perMs = ((state.disk.rate * 1e6) / 4096 / 1000) * (1 - guestAddon.gateThrottle() / 100);
    let due = Math.floor((t - scheduleStart) * perMs) - diskScheduled;
    if (due > perMs * Math.max(10, 2 * beatMs)) {
      diskScheduled += due - Math.ceil(perMs);
      due = Math.ceil(perMs);
    }
    if (due > 0) diskScheduled += guestAddon.diskWrite(due);
  }
  if (t - lastBeat >= beatMs) {
    lastBeat = t;
    heartbeat();
  }
  timer = setTimeout(tick, beatMs);
}
function start(): void {
  running = true;
  scheduleStart = performance.now();
  scheduled = 0;
  diskScheduled = 0;
  tick();
}
function stop(): void {
  running = false;
  if (timer) clearTimeout(timer);
}
async function verifyNow(): Promise<void> {
  const model = { content: state.content, seed: BigInt(state.seed), writes: st[1]!, span: state.span, sequential: state.pattern === 'sequential' };
  const tv = performance.now();
  const result = await verifyContent(region, model);
  const disk = state.disk ? { ...(await guestAddon.diskCheck()), writes: guestAddon.diskState().writes.toString() } : undefined;
  heartbeat({
    verify: { bad: result.bad, firstBad: result.firstBad, writes: model.writes.toString(), ms: performance.now() - tv, ...(disk ? { disk } : {}) },
  });
}
// SIGUSR2: check every page against the model now and say so in a heartbeat (writes wait, as
// after a hand-over): how a test tells that the copy left running holds what it should. Taken
// before the guest runs: a destination guest checks every page first, and a signal meanwhile
// must not meet the default action (which ends the process)
process.on('SIGUSR2', () => {
  if (!writing) return; // a check is running
  writing = false;
  void verifyNow().finally(() => {
    writing = true;
    scheduleStart = performance.now();
    scheduled = 0;
    diskScheduled = 0;
  });
});
if (incoming && postcopyGuest) {
  // Post-copy: write at once; pages not here yet fault in over the network. The check runs
  // once livemig says every page has arrived (writes pause meanwhile, heartbeats go on).
  start();
  const handle = incoming.handle;
  const poll = setInterval(() => {
    if (!guestAddon.incomingStatus(handle).allPresent) return;
    clearInterval(poll);
    writing = false;
    void verifyNow().then(() => {
      writing = true;
      scheduleStart = performance.now();
      scheduled = 0;
      diskScheduled = 0;
      serveAgain();
    });
  }, 5);
} else if (incoming) {
  // Verify outside the pause: heartbeats continue while every page is checked; writes wait.
  writing = false;
  start();
  await verifyNow();
  writing = true;
  scheduleStart = performance.now();
  scheduled = 0;
  diskScheduled = 0;
  serveAgain();
} else {
  serve(values.register ?? values.socket!, values.register !== undefined);
  start();
}

/** A guest that arrived (a daemon's, with --register) registers with that daemon, to be migrated again; its writes tracked as before. */
function serveAgain(): void {
  if (values.register === undefined) return;
  try {
    serve(values.register, true);
    trace('guest', GuestEvent.registeredAgain, { name: values.name });
  } catch (e) {
    // it runs on here, unlisted: said in its log, where the daemon keeps its output
    console.error(`the guest runs, but could not register with the daemon at ${values.register}: ${(e as Error).message}`);
  }
}

/** Serves livemig through the library, at `at` or (register) registered with the daemon there, for the life of the process. */
function serve(at: string, register: boolean): void {
  const tracked = !values['no-track'];
  if (tracked) protectOwnRegion(region); // kept open for the life of the process
  if (incoming && state.disk && !values['no-disk-track']) guestAddon.diskTrack(); // a disk that arrived is reported as at its source
  // the state's fields a pause does not change; the pause adds the run state (native/refguest/gate.cc)
  const fixed = JSON.stringify({
    version: state.version,
    size: state.size,
    content: state.content,
    seed: state.seed,
    pattern: state.pattern,
    span: state.span,
    rate: state.rate,
    ...(state.heartbeat ? { heartbeat: state.heartbeat } : {}),
    ...(state.beatMs ? { beatMs: state.beatMs } : {}),
    ...(state.disk ? { disk: state.disk } : {}),
  });
  guestAddon.serve(at, [{ address: region.address, size: region.size, ...memoryFile!, tracked }], st, fixed.slice(0, -1), { name: values.name, register });
  if (values.announce)
    process.stdout.write(
      JSON.stringify({ guest: { ...(register ? { registered: at, name: values.name } : { socket: at }), pid: process.pid, bytes: region.size } }) + '\n',
    );
}

process.on('SIGTERM', () => {
  stop();
  process.exit(0);
});
