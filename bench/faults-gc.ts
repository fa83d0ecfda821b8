/**
 * Preloaded by bench/faults into the receivers it measures (NODE_OPTIONS=--import): a full
 * garbage collection on SIGURG, acknowledged in a file with the JavaScript heap it left, so
 * that the bench can tell memory a crowd left held from garbage not collected yet (issue 29,
 * point 6), and held memory in the heap from memory outside it (OpenSSL's, the allocator's),
 * with no hook in `livemig receive` itself. SIGURG, because its default is to be ignored (a process without
 * this preload is not harmed by it) and neither livemig nor its guests use it.
 */
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';

const dir = process.env['LIVEMIG_BENCH_GC_DIR'];
// only the receiver: the guests and the crowd's process inherit NODE_OPTIONS as well
if (dir && process.argv[2] === 'receive') {
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc') as () => void;
  let done = 0;
  process.on('SIGURG', () => {
    gc();
    const m = process.memoryUsage();
    const mib = (n: number): number => +(n / 2 ** 20).toFixed(1);
    const ack = { done: ++done, heap_used_mib: mib(m.heapUsed), heap_total_mib: mib(m.heapTotal), external_mib: mib(m.external) };
    writeFileSync(path.join(dir, String(process.pid)), JSON.stringify(ack));
  });
}
