/**
 * Timeline tracing for finding where milliseconds go across processes. Off unless the
 * environment names a file in LIVEMIG_TRACE; then every process appends `ms pid event` lines
 * stamped with CLOCK_MONOTONIC (the same clock in every process on the host). Observers in the
 * same process can subscribe to the `livemig:trace` diagnostics channel instead.
 */
import { openSync, writeSync } from 'node:fs';
import diagnostics_channel from 'node:diagnostics_channel';

const channel = diagnostics_channel.channel('livemig:trace');
const file = process.env['LIVEMIG_TRACE'];
// opened once: an open and close per line would cost more than some of the steps it times
let fd: number | undefined;

export function trace(event: string): void {
  traceLine(event);
}

function traceLine(event: string): void {
  if (!file && !channel.hasSubscribers) return;
  const ms = Number(process.hrtime.bigint() / 1000n) / 1000;
  if (channel.hasSubscribers) channel.publish({ ms, event });
  if (file) {
    fd ??= openSync(file, 'a');
    writeSync(fd, `${ms.toFixed(3)} ${process.pid} ${event}\n`);
  }
}

// the first line is written at start-up: writing compiles Node's file functions, which must not
// happen for the first time inside a pause being timed
if (file) traceLine(`trace: ${process.argv.slice(1).join(' ')}`);
