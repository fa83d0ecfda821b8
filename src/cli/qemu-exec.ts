/**
 * `receive --qemu-exec` and the daemon's QEMU destinations: the operator's QEMU command line,
 * started once the region is reserved with the memory livemig receives as its RAM.
 */
import type { GuestLayout } from '../guest/layout.js';
import { LivemigError } from '../errors.js';
import type { ReservedMemory } from '../receiver/types.js';
import { disksMismatch, placedDisks } from '../vmm/qemu/disks.js';
import { IncomingQemu, MEMORY_PLACEHOLDER, checkQemuCommand } from '../vmm/qemu/incoming.js';
import { usageError } from './flags.js';

/** The operator's line, run by the shell (`exec`, so QEMU's pid is its own), livemig's flags after it. */
export function qemuCommand(line: string): string[] {
  if (line.trim().length === 0) throw usageError('--qemu-exec needs a command');
  if (!line.includes(MEMORY_PLACEHOLDER))
    throw usageError(
      `--qemu-exec: the command must name its RAM file with ${MEMORY_PLACEHOLDER} (-object memory-backend-file,...,mem-path=${MEMORY_PLACEHOLDER},share=on)`,
    );
  const command = ['/bin/sh', '-c', `exec ${line} "$@"`, 'sh'];
  try {
    checkQemuCommand([line]);
  } catch (e) {
    throw usageError(`--qemu-exec: ${(e as Error).message}`);
  }
  return command;
}

/**
 * Stopped by SIGINT or SIGTERM before the VM runs here, the receiver takes its QEMU with it: a
 * QEMU waiting for an incoming migration has no lease of its own and would wait forever. A VM
 * already running here runs on. Returns the undo.
 */
export function qemuGoesWithSignals(qemu: () => IncomingQemu | undefined): () => void {
  const stop = (signal: NodeJS.Signals): void => {
    const q = qemu();
    if (q && !q.running) process.stderr.write(`livemig: ${signal}: stopping the destination QEMU (pid ${q.pid}), which was not running yet\n`);
    q?.close();
    process.exit(signal === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  return () => {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
  };
}

/**
 * The disks the operator's line places (`{disk:NAME}`), and the check each source's disks get
 * at its HELLO, before anything is reserved: the same names, or the migration is refused.
 */
export function qemuDiskPlaces(line: string): { names: string[]; accept(source: readonly string[]): void } {
  const names = placedDisks([line]);
  return {
    names,
    accept: (source) => {
      const why = disksMismatch(source, names);
      if (why) throw new LivemigError('ERR_LIVEMIG_REFUSED', `a QEMU destination: ${why}`, { phase: 'handshake' });
    },
  };
}

/**
 * Starts the destination QEMU on the reserved memory: a VM with one memory backend, its disks on
 * the images created for them. A same-host upgrade hands it the source QEMU's own RAM file
 * (`local`): only device state moves.
 */
export function startQemu(
  command: readonly string[],
  layout: GuestLayout,
  memory: ReservedMemory,
  o: { stdout?: 'stderr' | 'ignore' } = {},
): Promise<IncomingQemu> {
  const refuse = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_REFUSED', `a QEMU destination: ${why}`, { phase: 'reserve' });
  if (layout.regions.length !== 1 || memory.files.length !== 1 || memory.files[0]!.offset !== 0)
    throw refuse(`the guest has ${layout.regions.length} regions; a QEMU VM has one memory backend`);
  const r = layout.regions[0]!;
  return IncomingQemu.start({
    command,
    memory: { fd: memory.files[0]!.fd, size: r.size, id: r.name },
    local: memory.local,
    disks: (memory.disks ?? []).map((d) => ({ name: d.name, path: d.path })),
    ...(o.stdout ? { stdout: o.stdout } : {}),
  });
}
