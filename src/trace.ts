/**
 * Timeline tracing for finding where milliseconds go across processes. Off unless the
 * environment names a file in LIVEMIG_TRACE; then every process appends `ms pid event` lines
 * stamped with CLOCK_MONOTONIC (the same clock in every process on the host). Observers in the
 * same process can subscribe to the `livemig:trace` diagnostics channel instead.
 */
import { appendFileSync } from 'node:fs';
import diagnostics_channel from 'node:diagnostics_channel';

const channel = diagnostics_channel.channel('livemig:trace');
const file = process.env['LIVEMIG_TRACE'];

export function trace(event: string): void {
  if (!file && !channel.hasSubscribers) return;
  const ms = Number(process.hrtime.bigint() / 1000n) / 1000;
  if (channel.hasSubscribers) channel.publish({ ms, event });
  if (file) appendFileSync(file, `${ms.toFixed(3)} ${process.pid} ${event}\n`);
}
