/**
 * Observability without a logger: named diagnostics_channel channels, one per event family,
 * each message a structured object (as undici publishes its own). Subscribers in the process
 * (a daemon, a test, a benchmark) get them through `diagnostics_channel.subscribe(name, fn)`.
 * Every event and its payload is in the catalogue, src/trace-events.ts.
 *
 *   livemig:source    the source's steps ({ ms, event, ... })
 *   livemig:receiver  the destination's steps
 *   livemig:guest     the reference guest's steps
 *   livemig:chooser   the page encoder's per-round accounting ({ ms, event, round, ... })
 *   livemig:daemon    the daemon's guests, migrations and API
 *
 * With LIVEMIG_TRACE naming a file, every process also appends `ms pid family: event` lines
 * stamped with CLOCK_MONOTONIC (the same clock in every process on the host), for lining up a
 * hand-over across processes.
 */
import { openSync, writeSync } from 'node:fs';
import diagnostics_channel from 'node:diagnostics_channel';
import type { TraceEvent, TraceFamily, TracePayload } from './trace-events.js';

export type { TraceFamily } from './trace-events.js';

/** The diagnostics_channel name of each family, for `diagnostics_channel.subscribe`. */
export const DIAGNOSTICS_CHANNEL_NAMES = {
  source: 'livemig:source',
  receiver: 'livemig:receiver',
  guest: 'livemig:guest',
  chooser: 'livemig:chooser',
  daemon: 'livemig:daemon',
} as const satisfies { readonly [F in TraceFamily]: string };

export const DIAGNOSTICS_CHANNELS: { readonly [F in TraceFamily]: diagnostics_channel.Channel } = {
  source: diagnostics_channel.channel(DIAGNOSTICS_CHANNEL_NAMES.source),
  receiver: diagnostics_channel.channel(DIAGNOSTICS_CHANNEL_NAMES.receiver),
  guest: diagnostics_channel.channel(DIAGNOSTICS_CHANNEL_NAMES.guest),
  chooser: diagnostics_channel.channel(DIAGNOSTICS_CHANNEL_NAMES.chooser),
  daemon: diagnostics_channel.channel(DIAGNOSTICS_CHANNEL_NAMES.daemon),
};

const file = process.env['LIVEMIG_TRACE'];
// opened once: an open and close per line would cost more than some of the steps it times
let fd: number | undefined;

/** Whether anyone listens to `family` (to skip building a costly payload). */
export function tracing(family: TraceFamily): boolean {
  return file !== undefined || DIAGNOSTICS_CHANNELS[family].hasSubscribers;
}

// an event without a payload takes no argument, so that forgetting one is an error
type PayloadArgs<P> = [P] extends [undefined] ? [] : [data: P];

/**
 * One step of `family`: `event` from its catalogue (src/trace-events.ts), `data` of the payload
 * the catalogue gives it, carried to subscribers and appended to the trace file.
 */
export function trace<F extends TraceFamily, E extends TraceEvent<F>>(family: F, event: E, ...payload: PayloadArgs<TracePayload<F, E>>): void {
  const data = payload[0] as Record<string, unknown> | undefined;
  const channel = DIAGNOSTICS_CHANNELS[family];
  if (!file && !channel.hasSubscribers) return;
  const ms = Number(process.hrtime.bigint() / 1000n) / 1000;
  if (channel.hasSubscribers) channel.publish({ ms, event, ...data });
  if (file) writeLine(`${ms.toFixed(3)} ${process.pid} ${family}: ${event}${data ? ' ' + JSON.stringify(data) : ''}\n`);
}

function writeLine(line: string): void {
  fd ??= openSync(file!, 'a');
  writeSync(fd, line);
}

// the first line is written at start-up: writing compiles Node's file functions, which must not
// happen for the first time inside a pause being timed
if (file) writeLine(`${(Number(process.hrtime.bigint() / 1000n) / 1000).toFixed(3)} ${process.pid} trace: ${process.argv.slice(1).join(' ')}\n`);
