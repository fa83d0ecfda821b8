/**
 * The preload library (native/qemu/preload.c) that makes QEMU's writes to its RAM exactly
 * trackable: where it is, and the environment that loads it into a QEMU (docs/QEMU.md).
 */
import { fileURLToPath } from 'node:url';

/** build/Release/livemig_qemu_preload.so, built by `npm install` */
export const QEMU_PRELOAD = fileURLToPath(new URL('../../../../build/Release/livemig_qemu_preload.so', import.meta.url));

/** The environment for a QEMU whose RAM files are `ramPaths` (its memory backends' mem-path). */
export function preloadEnv(ramPaths: readonly string[]): Record<string, string> {
  return { LD_PRELOAD: QEMU_PRELOAD, LIVEMIG_QEMU_RAM: ramPaths.join(':') };
}
