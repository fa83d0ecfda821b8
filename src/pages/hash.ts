import { invalidArgument } from '../errors.js';
import { addon, call } from '../native.js';

/** XXH64 of `data` in native code; equal to xxhash-wasm's h64Raw(data, seed). */
export function xxh64(data: Uint8Array, seed = 0n): bigint {
  if (!(data instanceof Uint8Array)) throw invalidArgument('data must be a Uint8Array or Buffer');
  if (typeof seed !== 'bigint' || seed < 0n || seed >= 1n << 64n) throw invalidArgument('seed must be a bigint in 0..2^64-1');
  const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return call('ERR_LIVEMIG_SYSCALL', 'hash', 'XXH64', () => addon.xxh64(buf, seed));
}
