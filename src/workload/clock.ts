/**
 * CLOCK_MONOTONIC in milliseconds. Unlike performance.now(), whose origin is each process's
 * start, this clock is the same in every process on the host, so a guest can stamp its
 * heartbeats and an observer elsewhere can compare the stamps.
 */
export function monotonicMs(): number {
  return Number(process.hrtime.bigint() / 1000n) / 1000;
}
