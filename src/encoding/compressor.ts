/** The sender's compressor: one worker thread running lz4-napi over whole batches. */
import { Worker } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';

const WORKER = fileURLToPath(new URL('./compress-worker.js', import.meta.url));

export interface CompressResult {
  ms: number;
  /** bytes given to the compressor, and what came out (incompressible pages count as raw) */
  input: number;
  output: number;
}

export class Compressor {
  readonly #worker = new Worker(WORKER);
  #pending: { resolve: (r: CompressResult) => void; reject: (e: Error) => void } | undefined;

  constructor() {
    this.#worker.on('message', (r: CompressResult) => {
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

  /** Compresses staging slots `slots` into output; lengths[k] = compressed bytes, or 0 for "keep raw". */
  compress(staging: SharedArrayBuffer, output: SharedArrayBuffer, lengths: SharedArrayBuffer, slots: Uint32Array, pageSize: number): Promise<CompressResult> {
    if (this.#pending) return Promise.reject(new Error('one batch at a time'));
    return new Promise((resolve, reject) => {
      this.#pending = { resolve, reject };
      this.#worker.postMessage({ staging, output, lengths, slots, pageSize });
    });
  }

  async close(): Promise<void> {
    await this.#worker.terminate();
  }
}
