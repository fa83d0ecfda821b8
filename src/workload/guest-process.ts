/**
 * The reference guest (entry: guest.ts, which switches on eager compilation first): a process
 * that owns a memfd region with docs/CONTENT.md's content and writes to it at a given rate, emitting
 * one heartbeat per millisecond (UDP, to an observer).
 *
 * Source mode (default): creates and fills its region, registers its own mapping for
 * write-protect tracking, hands the memfd to livemig over --socket together with a fast control
 * socket (pause/resume answered by a native thread, see docs/HANDOVER.md), then obeys JSON-line
 * commands on --socket: pause (answers with its state), resume, state, throttle, exit.
 * Incoming mode (--incoming, --go-fd): started warm on the destination; see waitForGo below.
 * Once told to go it verifies every page against its model (heartbeats go on meanwhile;
 * writes wait), reports the result, then continues writing where the source stopped.
 */
import { trace } from '../trace.js';
import { defaultSlices } from '../sched.js';
import dgram from 'node:dgram';
import { monotonicMs } from './clock.js';
import os from 'node:os';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import type net from 'node:net';
import { addon, closeFd } from '../native.js';
import { guestAddon } from './guest-addon.js';
import { handOverRegion } from '../region/handover.js';
import { Region } from '../region/region.js';
import { protectOwnRegion } from '../tracking/uffd-async.js';
import { fillContent, initialWriteState, verifyContent, type ContentName, type PatternName } from './content.js';
import { parseGuestState, type GuestState } from './state.js';

const { values } = parseArgs({
  options: {
    socket: { type: 'string' },
    size: { type: 'string', default: String(1 << 30) },
    content: { type: 'string', default: 'mixed' },
    seed: { type: 'string', default: '1' },
    rate: { type: 'string', default: '64' },
    pattern: { type: 'string', default: 'uniform' },
    'hot-size': { type: 'string', default: String(64 << 20) },
    heartbeat: { type: 'string' },
    incoming: { type: 'boolean', default: false },
    'no-track': { type: 'boolean', default: false },
    postcopy: { type: 'string', default: 'possible' },
    'go-fd': { type: 'string' },
  },
});

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

let region: Region;
let state: GuestState;
/** post-copy: run at once (faulting pages in as it touches them), verify when livemig says all arrived */
let postcopyGuest = false;
/** run state {write-stream xorshift, writes, heartbeat seq}: native code reads it at a pause */
const st = new BigUint64Array(3);

/**
 * Incoming mode: started on the destination during pre-copy, with the region on fd 3 and its
 * go socket on fd 5, warm (Node and the addon loaded, the region mapped). After 'ready' on the
 * IPC channel it blocks on the go socket (native/refguest/gate.cc has the wire): 'S' hands it its
 * state, checked and loaded before the source commits; 'G' starts it within microseconds, with
 * no event loop in between. End of stream: livemig gave up, there is no guest to run here.
 * Post-copy: the guest registers its mapping for minor faults (livemig maps each page in as it
 * arrives) and tells livemig its userfaultfd's number, which livemig copies (pidfd_getfd).
 * `--postcopy planned`: registered at once, nothing mapped ahead; `possible` (the default): the
 * mapping is populated for a fast pre-copy activation, and on 'U' its page-table entries are
 * dropped first (the pages stay in the memfd), so every page faults until livemig maps it.
 */
function registerForPostcopy(early: Region): number {
  addon.dropPageTables(early.address, early.size);
  const uffd = addon.uffdRegisterMinor(early.address, early.size);
  postcopyGuest = true;
  return uffd;
}

const TAG = { state: 0x53, stateOk: 0x73, register: 0x55, registered: 0x75, go: 0x47, going: 0x67, error: 0x65 } as const;

function waitForGo(fd: number, early: Region): GuestState {
  let loaded: GuestState | undefined;
  for (;;) {
    const m = guestAddon.waitCommand(fd);
    if (m === null) process.exit(0);
    switch (m.tag) {
      case TAG.state:
        try {
          const s = parseGuestState(m.body);
          if (s.size !== early.size) throw new Error(`state is for ${s.size} bytes, region has ${early.size}`);
          loaded = s;
          guestAddon.replyCommand(fd, TAG.stateOk);
        } catch (e) {
          guestAddon.replyCommand(fd, TAG.error, Buffer.from((e as Error).message.slice(0, 1000)));
        }
        break;
      case TAG.register: {
        const body = Buffer.alloc(12);
        body.writeUInt32LE(registerForPostcopy(early), 0);
        body.writeBigUInt64LE(early.address, 4);
        guestAddon.replyCommand(fd, TAG.registered, body);
        break;
      }
      case TAG.go:
        if (!loaded) {
          guestAddon.replyCommand(fd, TAG.error, Buffer.from('go before a state'));
          break;
        }
        guestAddon.replyCommand(fd, TAG.going);
        closeFd(fd, 'guest');
        return loaded;
      default:
        guestAddon.replyCommand(fd, TAG.error, Buffer.from(`unknown request ${m.tag}`));
    }
  }
}

if (values.incoming && values['go-fd'] === undefined) throw new Error('--incoming needs --go-fd');
if (values.incoming) {
  const early = Region.adopt(3, Number(values.size));
  let registered: { uffd: number; address: string } | undefined;
  if (values.postcopy === 'planned') {
    registered = { uffd: addon.uffdRegisterMinor(early.address, early.size), address: early.address.toString() };
    postcopyGuest = true;
  }
  // map and populate now, during pre-copy, so the activated guest runs at memory speed at once
  else await early.nativeHandle.populateAsync();
  trace('guest', 'incoming: populated');
  // the state check runs once now, not for the first time between 'S' and its answer
  parseGuestState(Buffer.from(JSON.stringify({ version: 1, size: early.size, content: 'zero', seed: '1', pattern: 'uniform', span: 1, rate: 0, xs: '1', writes: '0', heartbeatSeq: 0, throttle: 0 } satisfies GuestState)));
  process.send!({ op: 'ready', ...(registered ? { registered } : {}) });
  // while it only waits to be told to go, the main thread answers at once (a short slice, as
  // the control thread has); running, it is a vCPU with the default slice again
  addon.setThreadSlice(100_000);
  state = waitForGo(Number(values['go-fd']), early);
  addon.setThreadSlice(0);
  trace('guest', 'incoming: running');
  region = early;
  st[0] = BigInt(state.xs);
  st[1] = BigInt(state.writes);
  st[2] = BigInt(state.heartbeatSeq);
} else {
  const size = Number(values.size);
  const pattern = values.pattern as PatternName;
  const pages = size / 4096;
  const span = pattern === 'hot' ? Math.max(1, Math.min(pages, Math.floor(Number(values['hot-size']) / 4096))) : pages;
  region = Region.create(size, { name: 'livemig-guest', reserve: true });
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
    throttle: 0,
  };
}

// --- heartbeat: one UDP datagram per millisecond: {seq, writes, pid, t}; t is the guest's own
// CLOCK_MONOTONIC (shared by every process on the host) when it sent the beat, in ms
const [hbHost, hbPort] = state.heartbeat ? [state.heartbeat.split(':')[0]!, Number(state.heartbeat.split(':')[1])] : [undefined, 0];
let sentBeat = false;
function heartbeat(extra?: object): void {
  if (!hbHost) return;
  const seq = guestAddon.gateBeat(st);
  if (seq < 0) return; // paused: the guest is not running here
  const msg = Buffer.from(JSON.stringify({ seq, writes: st[1]!.toString(), pid: process.pid, t: monotonicMs(), ...extra }));
  if (!sentBeat) trace('guest', 'first beat', { seq });
  sentBeat = true;
  udp.send(msg, hbPort, hbHost);
}

// --- writes: rate MiB/s x 256 writes per second, in 1 ms slices; a backlog over 10 ms is dropped
let running = false;
let writing = true;
let timer: NodeJS.Timeout | undefined;
let scheduleStart = 0;
let scheduled = 0;
let lastBeat = 0;
let lastTick = 0;
let wasPaused = false;
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
  }
  if (t - lastTick > 3 && lastTick > 0) trace('guest', 'late tick', { ms_since_last: +(t - lastTick).toFixed(1) });
  lastTick = t;
  if (writing && state.rate > 0) {
    const perMs = (state.rate * 256 * (1 - state.throttle)) / 1000;
    let due = Math.floor((t - scheduleStart) * perMs) - scheduled;
    if (due > perMs * 10) {
      // fell more than 10 ms behind: drop the backlog, never burst to catch up
      scheduled += due - Math.ceil(perMs);
      due = Math.ceil(perMs);
    }
    if (due > 0) {
      guestAddon.guestWrite(region.address, region.size, st, due, state.span, state.pattern === 'sequential');
      scheduled += due;
    }
  }
  if (t - lastBeat >= 1) {
    lastBeat = t;
    heartbeat();
  }
  timer = setTimeout(tick, 1);
}
function start(): void {
  running = true;
  scheduleStart = performance.now();
  scheduled = 0;
  tick();
}
function stop(): void {
  running = false;
  if (timer) clearTimeout(timer);
}
function exportState(): GuestState {
  return { ...state, xs: st[0]!.toString(), writes: st[1]!.toString(), heartbeatSeq: Number(st[2]) };
}

let control: net.Socket | undefined;
async function verifyNow(): Promise<void> {
  const model = { content: state.content, seed: BigInt(state.seed), writes: st[1]!, span: state.span, sequential: state.pattern === 'sequential' };
  const tv = performance.now();
  const result = await verifyContent(region, model);
  heartbeat({ verify: { bad: result.bad, firstBad: result.firstBad, writes: model.writes.toString(), ms: performance.now() - tv } });
}
if (values.incoming && postcopyGuest) {
  // Post-copy: write at once; pages not here yet fault in over the network. livemig asks for
  // the check once every page has arrived (writes pause meanwhile, heartbeats go on).
  start();
  process.on('message', (m: { op?: string }) => {
    if (m.op !== 'verify') return;
    writing = false;
    void verifyNow().then(() => {
      writing = true;
      scheduleStart = performance.now();
      scheduled = 0;
      process.send?.({ op: 'verified' });
    });
  });
} else if (values.incoming) {
  // Verify outside the pause: heartbeats continue while every page is checked; writes wait.
  writing = false;
  start();
  const model = { content: state.content, seed: BigInt(state.seed), writes: st[1]!, span: state.span, sequential: state.pattern === 'sequential' };
  const tv = performance.now();
  const result = await verifyContent(region, model);
  heartbeat({ verify: { bad: result.bad, firstBad: result.firstBad, writes: model.writes.toString(), ms: performance.now() - tv } });
  writing = true;
  scheduleStart = performance.now();
  scheduled = 0;
} else {
  const protection = values['no-track'] ? undefined : protectOwnRegion(region);
  // pause and resume are answered by a native thread on a socket of their own (native/refguest/gate.cc)
  const [mine, theirs] = addon.socketPair();
  guestAddon.gateStart(mine, st);
  control = handOverRegion(values.socket!, region, { tracking: protection ? 'uffd-async' : 'none', info: { content: state.content, size: state.size }, controlFd: theirs });
  closeFd(theirs, 'guest');
  start();
}

function reply(o: object): void {
  control?.write(JSON.stringify(o) + '\n');
}
if (control) {
  const lines = createInterface({ input: control });
  lines.on('line', (line) => {
    let m: { op?: string };
    try {
      m = JSON.parse(line) as { op?: string };
    } catch {
      return reply({ op: 'error', message: 'not JSON' });
    }
    switch (m.op) {
      case 'pause':
        trace('guest', 'pause received');
        guestAddon.gateSetPaused(true);
        // the throttle is a migration's, not the guest's: wherever it resumes, it runs at full rate
        reply({ op: 'paused', state: { ...exportState(), throttle: 0 } });
        break;
      case 'resume':
        guestAddon.gateSetPaused(false);
        reply({ op: 'resumed' });
        break;
      case 'state':
        reply({ op: 'state', state: exportState() });
        break;
      case 'throttle': {
        // auto-converge: write at (100 - percent)% of the rate, like a throttled vCPU
        const pct = Number((m as { percent?: unknown }).percent);
        if (!(pct >= 0 && pct < 100)) {
          reply({ op: 'error', message: `throttle percent must be within 0..99, got ${String((m as { percent?: unknown }).percent)}` });
          break;
        }
        state.throttle = pct / 100;
        scheduleStart = performance.now();
        scheduled = 0;
        reply({ op: 'throttled', percent: pct });
        break;
      }
      case 'exit':
        stop();
        // freeing a large region is kernel work charged to this process: keep it out of the way
        os.setPriority(19);
        region.release();
        control!.end(() => process.exit(0));
        break;
      default:
        reply({ op: 'error', message: `unknown op ${String(m.op)}` });
    }
  });
  control.on('close', () => {
    // livemig went away: keep running as a guest would (it is still the primary here)
  });
  control.on('error', () => undefined); // a reset socket closes the control channel; the guest runs on
}
// SIGUSR2: check every page against the model now and say so in a heartbeat (writes wait, as
// after a hand-over): how a test tells that the copy left running holds what it should
process.on('SIGUSR2', () => {
  if (!writing) return; // a check is running
  writing = false;
  void verifyNow().finally(() => {
    writing = true;
    scheduleStart = performance.now();
    scheduled = 0;
  });
});
process.on('SIGTERM', () => {
  stop();
  process.exit(0);
});
