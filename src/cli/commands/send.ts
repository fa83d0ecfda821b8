/** livemig send: migrate a guest live to a receiver (one already running, or a reference guest started here). */
import { assertSecureEnough } from '../../security/tls.js';
import { LivemigError } from '../../errors.js';
import { connectRunningGuest } from '../../guest/connect.js';
import { SourceGuestSession } from '../../guest/source-session.js';
import { migrate } from '../../source/migrate.js';
import { MigrationControl, type PauseLease } from '../../source/types.js';
import { SourceGuest } from '../../workload/controller.js';
import { QemuSource } from '../../vmm/qemu/source.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import {
  BEAT_FLAG,
  DISK_FLAGS,
  GUEST_FLAGS,
  POLICY_FLAGS,
  beatMs,
  diskSpec,
  downtimeLimit,
  encodingFlags,
  guestSpec,
  maxRounds,
  policyFlags,
} from '../migration-flags.js';
import { LocalProgress } from '../local-progress.js';
import { SOURCE_SECURITY_FLAGS, credentialsFrom } from '../security-flags.js';
import { parseHostPort } from '../units.js';

/** how long a running guest has to say hello once connected */
const HELLO_TIMEOUT_MS = 10_000;

/** What send needs of a guest, whether it started it or found it running. */
interface Guest {
  memory: Pick<SourceGuestSession['memory'], 'region' | 'layout' | 'target' | 'untracked'> & Partial<Pick<SourceGuestSession['memory'], 'disks'>>;
  pieces: SourceGuestSession['pieces'];
  pid: number;
  /** the name its hello gave (a daemon at the destination lists it by this name) */
  name: string;
  pause(lease: PauseLease): Promise<Buffer>;
  commit(): Promise<void>;
  resume(): Promise<void>;
  /** slows the guest's writes (auto-converge); absent where the guest cannot be throttled */
  throttle?(percent: number): Promise<void>;
  /** why it cannot be (in the report: a VM that writes faster than the link then ends by the stall policy) */
  throttleRefusal?: string;
  release(): Promise<void>;
  /** livemig lets go; the guest runs on (and resumes itself if it was paused before the commitment) */
  detach(): void | Promise<void>;
}

function qemu(vm: QemuSource): Guest {
  return {
    memory: vm.memory,
    pieces: [{ fd: vm.ram.fd, offset: 0, size: vm.ram.size }],
    pid: vm.pid,
    name: vm.ram.id,
    pause: (lease) => vm.pause(lease),
    commit: () => vm.commit(),
    resume: () => vm.resume(),
    release: () => vm.release(),
    detach: () => vm.detach(),
    ...(vm.throttleRefusal === undefined ? { throttle: (p: number) => vm.throttle(p) } : { throttleRefusal: vm.throttleRefusal }),
  };
}

function running(session: SourceGuestSession): Guest {
  return {
    memory: session.memory,
    pieces: session.pieces,
    pid: session.pid,
    name: session.hello.name,
    pause: async (lease) => session.pause(lease),
    commit: () => session.commit(),
    resume: async () => session.resume(),
    throttle: async (p) => session.throttle(p),
    release: async () => session.release(),
    detach: () => session.close(),
  };
}

function started(g: SourceGuest): Guest {
  return {
    memory: g.memory,
    pieces: g.session.pieces,
    pid: g.child.pid ?? 0,
    name: g.session.hello.name,
    pause: (lease) => g.pause(lease),
    commit: () => g.commit(),
    resume: () => g.resume(),
    throttle: (p) => g.throttle(p),
    release: () => g.exit(),
    detach: () => g.detach(),
  };
}

/**
 * SIGINT/SIGTERM cancel before the commitment (the guest resumes here), as the API's cancel does:
 * killed outright, a VMM without a lease of its own (QEMU) would stay paused. Returns the undo.
 */
function cancelOnSignals(control: MigrationControl): () => void {
  const cancel = (signal: string): void => {
    try {
      control.cancel();
      process.stderr.write(`livemig: ${signal}: cancelling the migration\n`);
    } catch (e) {
      process.stderr.write(`livemig: ${signal}: ${(e as Error).message}\n`);
    }
  };
  const onInt = (): void => cancel('SIGINT');
  const onTerm = (): void => cancel('SIGTERM');
  process.on('SIGINT', onInt);
  process.on('SIGTERM', onTerm);
  return () => {
    process.off('SIGINT', onInt);
    process.off('SIGTERM', onTerm);
  };
}

/**
 * A VM's disks move by pre-copy only so far: into QEMU by post-copy they would wait on the
 * images' fanotify marks inside QEMU's block layer, which no test has run. Refused before
 * anything moves, the VM let go untouched.
 */
async function qemuWithDisksByPrecopy(vm: QemuSource, mode: string | undefined): Promise<QemuSource> {
  if (vm.disks.length === 0 || mode === undefined || mode === 'precopy') return vm;
  await vm.detach();
  throw new LivemigError(
    'ERR_LIVEMIG_UNSUPPORTED',
    `--mode ${mode}: the VM has disks (${vm.disks.map((d) => d.name).join(', ')}), which move into QEMU by pre-copy only so far (docs/QEMU.md)`,
    { phase: 'validate' },
  );
}

/** What `--qemu` does not take: another guest. */
function refuseForQemu(socket: string | undefined): void {
  if (socket !== undefined) throw usageError('--qemu takes a QEMU VM: not with --guest');
}

export const send: Command = {
  name: 'send',
  summary: 'migrate a guest live to a receiver',
  synopsis: '--to HOST:PORT [--guest PATH] [flags]',
  description: [
    'Migrates a guest live to `livemig receive` at HOST:PORT: the guest serving at --guest PATH',
    '(the reference guest of `livemig guest`, the C example guest, or any guest that follows',
    'docs/GUEST.md), or without --guest a reference guest started here for the purpose.',
    'Prints the migration report as JSON on stdout, and progress on stderr: the handshake and',
    'each round as a line, and every 250 ms the percentage, region bytes left of the whole, bytes',
    'sent (and on the wire), throughput, dirty rate, expected pause and ETA; on a terminal one',
    'line redrawn in place, otherwise a line per sample (none with --json). On a failure it prints',
    '{error: {code, phase, message}, source_guest, guest_pid} and exits 1, leaving the guest',
    'to run on: source_guest is none (no guest answered at --guest PATH, or none started),',
    'running (resumed here: any failure before the commitment), paused (the outcome could not',
    'be confirmed: see `livemig resolve`) or released (it runs at the destination). With',
    "--local (a VMM restarting into a new version on this host) the guest's memory files go to",
    'the destination guest as they are: it pauses once, only its device state moves; a receiver',
    'on another host refuses (ERR_LIVEMIG_NOT_LOCAL). SIGINT or SIGTERM cancels a migration before its',
    'commitment (ERR_LIVEMIG_CANCELLED; the guest runs on here); after it, the migration finishes. With',
    '--qemu QMP_SOCKET the guest is a QEMU VM (docs/QEMU.md).',
  ].join('\n'),
  flags: {
    to: { type: 'string', value: 'HOST:PORT', help: 'the receiver (required)' },
    qemu: {
      type: 'string',
      value: 'QMP_SOCKET',
      help:
        'migrate the QEMU VM whose QMP socket this is (its RAM on a shared file: -object memory-backend-file,...,share=on); ' +
        "livemig moves the RAM, QEMU's own stream only its device state (docs/QEMU.md)",
    },
    guest: {
      type: 'string',
      value: 'PATH',
      help: 'migrate the guest serving at this unix socket, running already: nothing there fails at once (default: start a reference guest)',
    },
    heartbeat: { type: 'string', value: 'HOST:PORT', help: 'where a reference guest started here sends its UDP heartbeats (default none)' },
    local: {
      type: 'boolean',
      default: false,
      help: "same-host upgrade: the guest's memfds go to the destination guest, no page is copied (refused unless the receiver runs on this host)",
    },
    ...GUEST_FLAGS,
    ...DISK_FLAGS,
    'disk-image': { type: 'string', value: 'PATH', help: "without --guest, with --disk: where the started guest's disk image is created" },
    ...BEAT_FLAG,
    ...POLICY_FLAGS,
    ...SOURCE_SECURITY_FLAGS,
  },
  async run(v: FlagValues): Promise<number> {
    if (typeof v['to'] !== 'string') throw usageError("send needs --to HOST:PORT (see 'livemig send --help')");
    const to = parseHostPort(str(v, 'to'), '--to');
    const credentials = credentialsFrom(v, 'source');
    const settings = {
      downtimeLimitMs: downtimeLimit(v),
      maxRounds: maxRounds(v),
      encodings: encodingFlags(v),
      ...policyFlags(v),
      ...(credentials ? { credentials } : {}),
      ...(v['insecure'] === true ? { insecure: true } : {}),
    };
    // refused before a guest starts, or is touched
    assertSecureEnough(to.host, credentials, v['insecure'] === true, 'migrating to');
    const socket = typeof v['guest'] === 'string' ? v['guest'] : undefined;
    const qmp = typeof v['qemu'] === 'string' ? v['qemu'] : undefined;
    if (qmp !== undefined) refuseForQemu(socket);
    const disk = diskSpec(v);
    const image = typeof v['disk-image'] === 'string' ? v['disk-image'] : undefined;
    if ((disk === undefined) !== (image === undefined)) throw usageError('--disk SIZE and --disk-image PATH go together');
    if (disk && (socket !== undefined || qmp !== undefined))
      throw usageError("--disk gives a guest started here a disk: a guest at --guest brings its own (its hello's)");
    const spec =
      socket === undefined
        ? {
            ...guestSpec(v),
            ...beatMs(v),
            ...(typeof v['heartbeat'] === 'string' ? { heartbeat: v['heartbeat'] } : {}),
            ...(disk && image ? { diskImage: { ...disk, path: image } } : {}),
          }
        : undefined;
    let guest: Guest;
    // which guest a failure leaves: none until one answers (or was started here)
    let before: 'none' | 'running' = 'none';
    try {
      if (qmp !== undefined) {
        // a VM refused once QEMU answered (its disks, its RAM) runs on, untouched
        guest = qemu(await qemuWithDisksByPrecopy(await QemuSource.attach(qmp, () => (before = 'running')), settings.mode));
      } else if (socket !== undefined) {
        const fd = connectRunningGuest(socket);
        before = 'running';
        guest = running(await SourceGuestSession.take(fd, HELLO_TIMEOUT_MS, `the guest at ${socket}`));
      } else {
        guest = started(await SourceGuest.spawn(spec!));
      }
    } catch (e) {
      // nothing moved: a guest that was running runs on, untouched
      const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_GUEST', (e as Error).message, { phase: 'handover', cause: e });
      process.stdout.write(JSON.stringify({ error: { code: err.code, phase: err.phase, message: err.message }, source_guest: before }) + '\n');
      process.stderr.write(`livemig: ${err.code} (${err.phase ?? 'handover'}): ${err.message}\n`);
      return 1;
    }
    // what became of the guest, for the failure report
    let state = 'running' as 'running' | 'paused' | 'released';
    const control = new MigrationControl();
    const live = v['json'] === true ? undefined : new LocalProgress({ control, totalBytes: guest.memory.region.size });
    const ignoreSignals = cancelOnSignals(control);
    const cpu0 = process.cpuUsage();
    try {
      const report = await migrate({
        ...guest.memory,
        guestName: guest.name,
        ...(v['local'] === true ? { local: { pieces: guest.pieces } } : {}),
        to,
        pause: async (lease) => {
          state = 'paused'; // (a pause that fails half-way is resumed by the rollback)
          return guest.pause(lease);
        },
        commit: () => guest.commit(),
        resume: async () => {
          await guest.resume();
          state = 'running';
        },
        release: async () => {
          await guest.release();
          state = 'released';
        },
        ...(guest.throttle ? { throttle: (p: number) => guest.throttle!(p) } : {}),
        ...settings,
        control,
        ...(live ? { onProgress: live.onProgress } : {}),
      });
      live?.end({ completed: true });
      // this process's CPU from the guest's attach to the report (the guest is its own process)
      const cpu = process.cpuUsage(cpu0);
      const cpu_s = { user: +(cpu.user / 1e6).toFixed(3), system: +(cpu.system / 1e6).toFixed(3) };
      process.stdout.write(JSON.stringify({ ...report, ...(guest.throttleRefusal ? { throttle_refusal: guest.throttleRefusal } : {}), cpu_s }) + '\n');
      return 0;
    } catch (e) {
      live?.end({ completed: false });
      const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_ABORTED', (e as Error).message, { phase: 'migrate', cause: e });
      if (state !== 'released') await guest.detach(); // it runs on (or waits, paused) without us
      process.stdout.write(
        JSON.stringify({ error: { code: err.code, phase: err.phase, message: err.message }, source_guest: state, guest_pid: guest.pid }) + '\n',
      );
      process.stderr.write(`livemig: ${err.code} (${err.phase ?? 'migrate'}): ${err.message}; the source guest is ${state} (pid ${guest.pid})\n`);
      return 1;
    } finally {
      ignoreSignals();
    }
  },
};
