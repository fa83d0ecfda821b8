/** A kept image of a region (a guest that left this host): loaded first, so that only what differs is sent. */
import { open } from 'node:fs/promises';
import { LivemigError } from '../errors.js';
import { addon, callAsync } from '../native.js';
import type { Region } from '../region/region.js';

/**
 * Loads a kept image into a freshly reserved region and hashes it. An image of another size
 * is not this region's: it is ignored (every page is sent), never partly applied.
 */
export async function loadImage(region: Region, path: string, hashes: BigUint64Array): Promise<boolean> {
  const fh = await open(path, 'r').catch((e: unknown) => {
    throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `cannot open the reuse image ${path}: ${(e as Error).message}`, { phase: 'reserve', cause: e });
  });
  try {
    const st = await fh.stat();
    if (st.size !== region.size) return false;
    const view = region.view(0, region.size);
    for (let off = 0; off < region.size;) {
      const { bytesRead } = await fh.read(view, off, Math.min(64 << 20, region.size - off), off);
      if (bytesRead === 0) throw new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', `the reuse image ${path} ended early`, { phase: 'reserve' });
      off += bytesRead;
    }
  } finally {
    await fh.close();
  }
  await callAsync('ERR_LIVEMIG_SYSCALL', 'reserve', 'hashing the reuse image', () => addon.hashAll(region.nativeHandle, hashes));
  return true;
}
