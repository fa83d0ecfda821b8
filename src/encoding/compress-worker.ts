/**
 * Worker thread: compresses the pages of a batch with lz4-napi, off the main thread, from a
 * shared staging buffer into a shared output buffer (page slot k -> output slot k). A page
 * whose compressed form is not at least 1/8 smaller stays raw (length 0).
 */
import { parentPort } from 'node:worker_threads';
import { compressSync } from 'lz4-napi';

interface Job {
  staging: SharedArrayBuffer;
  output: SharedArrayBuffer;
  lengths: SharedArrayBuffer;
  slots: Uint32Array;
  pageSize: number;
}

parentPort!.on('message', (job: Job) => {
  const t0 = performance.now();
  const lengths = new Int32Array(job.lengths);
  const limit = job.pageSize - (job.pageSize >> 3);
  let input = 0;
  let output = 0;
  for (const k of job.slots) {
    const page = Buffer.from(job.staging, k * job.pageSize, job.pageSize);
    const c = compressSync(page);
    input += job.pageSize;
    output += Math.min(c.length, job.pageSize);
    if (c.length <= limit) {
      Buffer.from(job.output, k * job.pageSize, job.pageSize).set(c);
      lengths[k] = c.length;
    } else {
      lengths[k] = 0;
    }
  }
  parentPort!.postMessage({ ms: performance.now() - t0, input, output });
});
