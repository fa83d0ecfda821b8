/**
 * The sender's compressor: worker threads running lz4-napi, each over its share of a batch's
 * pages. lz4-napi compresses a page in tens of microseconds here (about 140 MB/s per thread,
 * bench/RESULTS.md), so on a slow link, where the sending thread mostly waits, two threads
 * keep up where one would not.
 */
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';

const WORKER = fileURLToPath(new URL('./compress-worker.js', import.meta.url));

/**
 * One job: groups of staging slots (pairs: first slot, slot count) compressed into output; for
 * a group starting at k, lengths[k] = compressed bytes, or 0 for "keep raw".
 */
export interface CompressJob {
  staging: SharedArrayBuffer;
  output: SharedArrayBuffer;
  lengths: SharedArrayBuffer;
  /** pairs: first slot, number of slots */
  groups: Uint32Array;
  pageSize: number;
}

export interface CompressResult {
  /** compressing time of the job: the longest of its workers' (they run side by side) */
  ms: number;
  /** bytes given to the compressor, and what came out (incompressible pages count as raw) */
  input: number;
  output: number;
}

class CompressWorker {
  readonly #worker = new Worker(WORKER);
  #pending: { resolve: (r: CompressResult) => void; reject: (e: Error) => void } | undefined;
  /** resolves once the worker has loaded lz4-napi and compressed a page */
  readonly ready: Promise<void>;

  constructor() {
    let started: { resolve: () => void; reject: (e: Error) => void } | undefined;
    this.ready = new Promise<void>((resolve, reject) => (started = { resolve, reject }));
    this.ready.catch(() => undefined); // also reported to the job waiting on it, or by close()
    this.#worker.on('error', (e) => started!.reject(e));
    this.#worker.on('message', (r: CompressResult | { ready: true }) => {
      if ('ready' in r) return started!.resolve();
      const p = this.#pending;
      this.#pending = undefined;
      p?.resolve(r);
    });
    this.#worker.on('error', (e) => {
      const p = this.#pending;
      this.#pending = undefined;
      p?.reject(e);
    });
    this.#worker.unref();
  }

  run(job: CompressJob): Promise<CompressResult> {
    if (this.#pending) return Promise.reject(new Error('one job per worker at a time'));
    return new Promise((resolve, reject) => {
      this.#pending = { resolve, reject };
      this.#worker.postMessage(job);
    });
  }

  terminate(): Promise<number> {
    return this.#worker.terminate();
  }
}

export class Compressor {
  readonly #workers: CompressWorker[];

  constructor(threads = Math.min(2, availableParallelism())) {
    this.#workers = Array.from({ length: Math.max(1, threads) }, () => new CompressWorker());
  }

  /** Runs a job (see CompressJob), its groups shared out among the workers. One job at a time. */
  async compress(job: CompressJob): Promise<CompressResult> {
    const { groups } = job;
    const n = this.#workers.length;
    const parts = this.#workers
      .map((_, w) => {
        const mine: number[] = [];
        for (let i = 0; i < groups.length; i += 2) if ((i >> 1) % n === w) mine.push(groups[i]!, groups[i + 1]!);
        return Uint32Array.from(mine);
      })
      .filter((p) => p.length > 0);
    const results = await Promise.all(parts.map((p, w) => this.#workers[w]!.run({ ...job, groups: p })));
    // the workers' own time: a message's trip and a worker's start-up say nothing about lz4
    return { ms: Math.max(...results.map((r) => r.ms)), input: results.reduce((a, r) => a + r.input, 0), output: results.reduce((a, r) => a + r.output, 0) };
  }

  /** Waits until every worker can take a job. */
  async ready(): Promise<void> {
    await Promise.all(this.#workers.map((w) => w.ready));
  }

  async close(): Promise<void> {
    await Promise.all(this.#workers.map((w) => w.terminate()));
  }
}

/**
 * Compressors started ahead of need: a worker's start-up (an isolate, the lz4 module) takes
 * hundreds of milliseconds on a busy host, better spent while the destination reserves than
 * after it. Each is taken once; close() ends those never taken.
 */
export class CompressorPool {
  #spare: Compressor[] = [];

  start(count: number): void {
    for (let i = 0; i < count; i++) this.#spare.push(new Compressor());
  }

  take(): Compressor | undefined {
    return this.#spare.shift();
  }

  async close(): Promise<void> {
    await Promise.all(this.#spare.splice(0).map((c) => c.close()));
  }
}
