/**
 * What an outgoing migration needs of the guest it moves, whichever kind it is: a contract
 * guest on its registration connection (docs/GUEST.md), or a QEMU VM taken over QMP for the
 * migration (src/vmm/qemu/source.ts). Each call means what migrate() means by it.
 */
import type { SourceGuestSession } from '../guest/source-session.js';
import type { MigrateOptions, PauseLease } from '../source/types.js';
import type { QemuSource } from '../vmm/qemu/source.js';

export interface MovingGuest {
  memory: Pick<MigrateOptions, 'region' | 'layout' | 'target' | 'untracked' | 'disks'>;
  /** its memory as files (a kept image is one of them) */
  pieces: { fd: number; offset: number; size: number }[];
  pause(lease: PauseLease): Promise<Buffer>;
  commit(): Promise<void>;
  resume(): Promise<void>;
  release(): Promise<void>;
  /** absent where the guest cannot be slowed (a QEMU whose vCPUs have no CPU cgroup of their own) */
  throttle?(percent: number): Promise<void>;
  /**
   * The migration ended and the guest was not released: livemig lets go of what it took for the
   * migration (a QEMU: resumed if paused before the commitment, its migration settings back, QMP
   * closed). A contract guest's connection is the registry's, which keeps or closes it.
   */
  letGo(): Promise<void>;
}

export function contractGuest(session: SourceGuestSession): MovingGuest {
  return {
    memory: session.memory,
    pieces: session.pieces,
    pause: async (lease) => session.pause(lease),
    commit: () => session.commit(),
    resume: async () => session.resume(),
    release: async () => session.release(),
    throttle: async (p) => session.throttle(p),
    letGo: async () => undefined,
  };
}

export function qemuGuest(vm: QemuSource): MovingGuest {
  return {
    memory: vm.memory,
    pieces: [{ fd: vm.ram.fd, offset: 0, size: vm.ram.size }],
    pause: (lease) => vm.pause(lease),
    commit: () => vm.commit(),
    resume: () => vm.resume(),
    release: () => vm.release(),
    ...(vm.throttleRefusal === undefined ? { throttle: (p: number) => vm.throttle(p) } : {}),
    letGo: () => vm.detach(),
  };
}
