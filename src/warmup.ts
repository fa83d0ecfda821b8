/**
 * Runs, once, the parts of Node that a hand-over uses and that nothing before it may have used.
 * Node's own modules come from a start-up snapshot whose functions compile on their first call;
 * `--no-lazy` (src/eager.ts) does not reach them. Sampled inside the pause before this existed:
 * the receiver spent ~1.3 ms compiling setImmediate's internals, the incoming guest ~1 ms on
 * its timers' and the paused source guest ~1 ms on a timer list of a new duration.
 */
let warmed = false;

export function warmUpRuntime(): void {
  if (warmed) return;
  warmed = true;
  const noop = (): void => undefined;
  // let each kind of timer fire once: the firing path compiles too (all unref'd: no process waits)
  setImmediate(noop).unref();
  for (const ms of [1, 5]) setTimeout(noop, ms).unref();
  clearTimeout(setTimeout(noop, 1000));
  process.nextTick(noop);
  queueMicrotask(noop);
  // buffers as the hand-over makes them: copies of typed arrays, views, small integer fields
  const bytes = Buffer.from(new Uint8Array(16));
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, 12).subarray(2, 10);
  view.writeUInt16LE(1, 0);
  view.writeUInt32LE(1, 2);
  view.readUInt32LE(2);
  bytes.writeBigUInt64LE(1n, 8);
  bytes.readBigUInt64LE(8);
  JSON.parse(JSON.stringify({ n: 1, s: view.toString('utf8'), b: 1n.toString() }));
  performance.now();
  process.hrtime.bigint();
}
