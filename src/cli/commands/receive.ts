/** livemig receive: serve one migration; the reference guest resumes here. */
import type { LivemigError } from '../../errors.js';
import { listen, type Receiver } from '../../receiver/listen.js';
import type { ReceiveOptions } from '../../receiver/types.js';
import { isRefusedBeforeReserving, mayBeAskedAbout } from '../../receiver/receiver.js';
import type { Refusal } from '../../refusals.js';
import { IncomingGuest } from '../../guest/incoming-session.js';
import { referenceIncomingCommand } from '../../workload/controller.js';
import path from 'node:path';
import { unplainPath } from '../../vmm/qemu/disks.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { DESTINATION_SECURITY_FLAGS, credentialsFrom } from '../security-flags.js';
import { parseHostPort, parseNumber, parseSize } from '../units.js';
import { channelCount, diskDir, keepDisks } from '../migration-flags.js';
import { qemuCommand, qemuDiskPlaces, qemuGoesWithSignals, startQemu } from '../qemu-exec.js';
import type { IncomingQemu } from '../../vmm/qemu/incoming.js';
import { postcopyRefusal as qemuPostcopyRefusal } from '../../vmm/qemu/postcopy.js';

/**
 * Post-copy: the incoming guest registers its mapping for minor faults; into QEMU, the preload
 * library does it inside the QEMU livemig started (docs/QEMU.md), offered only where it is built.
 */
function postcopyHooks(o: {
  intoQemu: boolean;
  qemu: () => IncomingQemu | undefined;
  incoming: () => IncomingGuest | undefined;
}): Pick<ReceiveOptions, 'postcopy'> {
  const { intoQemu, qemu, incoming } = o;
  // its disks by pre-copy only: it reads them as it starts, where their marks would hold it
  if (intoQemu)
    return qemuPostcopyRefusal() === undefined ? { postcopy: { register: async () => qemu()!.register(), disksRefusal: QEMU_DISKS_BY_PRECOPY } } : {};
  return { postcopy: { register: () => incoming()!.register(), giveDiskAsks: (fd: number) => incoming()!.giveDiskAsks(fd) } };
}

/** Post-copy is over: the guest is told; a QEMU's writes are tracked again for its next migration. */
function allPresent(qemu: IncomingQemu | undefined, incoming: IncomingGuest | undefined): void {
  if (!qemu) return incoming!.allPresent();
  const why = qemu.allPresent();
  if (why) process.stderr.write(`livemig: the VM's writes are not tracked for its next migration (it will be hashed): ${why}\n`);
}

export const receive: Command = {
  name: 'receive',
  summary: 'serve one migration; the guest resumes here',
  synopsis: "[--listen HOST:PORT] [--guest-exec 'COMMAND ... {socket}'] [flags]",
  description: [
    'Listens for one migration from `livemig send` (or the library), reserves the region,',
    'receives and verifies it, and resumes the guest here: the reference guest, or the command',
    'given with --guest-exec, started with {socket} replaced by a socket path where it serves',
    'livemig (docs/GUEST.md) and handed its regions before the pages flow. Prints one JSON line when',
    'listening ({listening, port}), one when a migration has reserved its region ({receiving}),',
    'and one with the outcome ({received, guest_pid} or {error}). When the source may not have',
    'heard the outcome, it keeps answering its RESOLVE for --linger seconds ({lingering}).',
    'Every source refused here (a scan, failed authentication, a certificate name not in --allow,',
    'pre-shared keys that differ, a bad HELLO, busy) prints one {refused: {from, reason, code, phase,',
    'message}} line; refused before anything was reserved, the receiver goes on listening.',
    'Exits 0 when the guest runs here, 1 when a migration failed (nothing was activated).',
  ].join('\n'),
  flags: {
    listen: { type: 'string', default: '127.0.0.1:7878', value: 'HOST:PORT', help: 'where to listen (port 0: any free port)' },
    'max-region': { type: 'string', value: 'SIZE', help: 'refuse larger regions (default: what the memory allows)' },
    'max-channels': {
      type: 'string',
      value: 'N',
      help: "grant a source at most N parallel channels, 1..16 (default: what libuv's pool reads at once, UV_THREADPOOL_SIZE less one)",
    },
    'handshake-timeout': { type: 'string', default: '10', value: 'SECONDS', help: 'a connection must authenticate and send its first frame within this' },
    'progress-timeout': { type: 'string', default: '30', value: 'SECONDS', help: 'nothing from the source this long: the migration is discarded here' },
    'recover-timeout': { type: 'string', default: '60', value: 'SECONDS', help: 'post-copy: how long to wait for the source to come back after a break' },
    linger: {
      type: 'string',
      default: '60',
      value: 'SECONDS',
      help: 'after an outcome the source may not have heard, answer its RESOLVE this long before exiting',
    },
    'max-device-state': { type: 'string', value: 'SIZE', help: 'refuse a larger device state (default 64MiB)' },
    prealloc: {
      type: 'boolean',
      default: false,
      help:
        "touch the memory of a guest coming in before its first page, as QEMU's destination prealloc: the first pass then runs at memory " +
        'speed where this host is slow to hand over memory, and the preparation takes that time instead; where disk post-copy may follow, the ' +
        "images' page cache too, so that a guest's read of a missing block waits less (default: memory is touched as pages arrive)",
    },
    'disk-dir': {
      type: 'string',
      value: 'DIR',
      help:
        "take the guest's disks: each disk a source names is created here as DIR/NAME.img, sparse, never over an existing file, " +
        'removed if the migration fails before activation (default: migrations with disks are refused)',
    },
    'keep-disks': {
      type: 'string',
      value: 'SECONDS',
      help:
        "with --disk-dir: a migration that fails before the guest runs here keeps its images that long (as NAME.img.partial), and the guest's " +
        'next migration here sends only the blocks that differ (default 0: removed at once)',
    },
    'reuse-image': { type: 'string', value: 'PATH', help: 'an image of the region this host kept: only what differs is sent' },
    'guest-exec': { type: 'string', value: "'COMMAND ... {socket}'", help: 'the destination guest to start (run by /bin/sh; default: the reference guest)' },
    'qemu-exec': {
      type: 'string',
      value: "'qemu-system-x86_64 ... {memory}'",
      help:
        "a QEMU VM comes in (livemig send --qemu): QEMU's command line, run by /bin/sh, the source VM's own with its memory backend's " +
        'mem-path={memory} (livemig hands QEMU the RAM it receives there) and each raw disk at file={disk:NAME} (NAME: the -drive id; ' +
        'livemig creates the image in --disk-dir and puts its path there); livemig adds -qmp, -incoming defer and -S (docs/QEMU.md)',
    },
    json: { type: 'boolean', default: false, help: 'accepted for symmetry with send (the output is JSON lines already)' },
    ...DESTINATION_SECURITY_FLAGS,
  },
  async run(v: FlagValues): Promise<number> {
    const { host, port } = parseHostPort(str(v, 'listen'), '--listen');
    const lingerMs = parseNumber(str(v, 'linger'), '--linger (seconds)') * 1000;
    const credentials = credentialsFrom(v, 'destination');
    let guestPid = 0;
    let incoming: IncomingGuest | undefined;
    let qemu: IncomingQemu | undefined;
    const qemuLine = typeof v['qemu-exec'] === 'string' ? qemuCommand(v['qemu-exec']) : undefined;
    const qemuDisks = qemuLine ? qemuDiskPlacesOf(v) : undefined;
    if (qemuLine) qemuGoesWithSignals(() => qemu);
    const command = typeof v['guest-exec'] === 'string' ? shellCommand(v['guest-exec']) : referenceIncomingCommand();
    const rx = await listen(
      host,
      port,
      {
        ...(credentials ? { credentials } : {}),
        ...(v['insecure'] === true ? { insecure: true } : {}),
        ...(typeof v['max-region'] === 'string' ? { maxRegionBytes: parseSize(v['max-region'], '--max-region') } : {}),
        ...(typeof v['max-channels'] === 'string' ? { maxChannels: channelCount(v['max-channels'], '--max-channels') } : {}),
        ...(typeof v['handshake-timeout'] === 'string'
          ? { authTimeoutMs: parseNumber(v['handshake-timeout'], '--handshake-timeout (seconds)', Number.MIN_VALUE) * 1000 }
          : {}),
        recoverTimeoutMs: parseNumber(str(v, 'recover-timeout'), '--recover-timeout (seconds)', Number.MIN_VALUE) * 1000,
        idleTimeoutMs: parseNumber(str(v, 'progress-timeout'), '--progress-timeout (seconds)', Number.MIN_VALUE) * 1000,
        ...(typeof v['max-device-state'] === 'string' ? { maxDeviceStateBytes: parseSize(v['max-device-state'], '--max-device-state') } : {}),
        ...(typeof v['reuse-image'] === 'string' ? { reuseImage: v['reuse-image'] } : {}),
        ...(v['prealloc'] === true ? { prealloc: true } : {}),
        ...receiveDisks(v, qemuDisks),
        // the guest maps its memory before pages flow, not during
        onReserved: async (_region, postcopy, layout, memory) => {
          if (qemuLine) {
            qemu = await startQemu(qemuLine, layout, memory);
            return;
          }
          // a same-host upgrade's guest maps the memory as it goes: populating it would be the whole cost
          incoming = await IncomingGuest.start({
            command,
            layout,
            files: memory.files,
            ...(memory.disks ? { disks: memory.disks } : {}),
            populate: postcopy !== 'planned' && !memory.local,
            registerEarly: postcopy === 'planned',
          });
        },
        ...postcopyHooks({ intoQemu: qemuLine !== undefined, qemu: () => qemu, incoming: () => incoming }),
        // a migration has begun: from here on it ends in an outcome line
        onProgress: (e) => {
          if (e.type === 'reserved')
            process.stdout.write(JSON.stringify({ receiving: { region_bytes: e.region_bytes, reserve_ms: +e.reserve_ms.toFixed(1) } }) + '\n');
        },
        onDiscard: () => (qemu?.kill(), incoming?.kill()),
        prepare: (_region, deviceState, o) => (qemu ? qemu.prepare(deviceState, o) : incoming!.prepare(deviceState)),
        activate: async (_region, deviceState) => {
          if (qemu) {
            await qemu.activate(deviceState);
            guestPid = qemu.pid;
            return;
          }
          await incoming!.activate(deviceState);
          guestPid = incoming!.pid;
        },
      },
      { onRefused: printRefusal },
    );
    process.stdout.write(JSON.stringify({ listening: `${rx.address}:${rx.port}`, port: rx.port }) + '\n');
    const cpu0 = process.cpuUsage();
    try {
      // a HELLO refused before anything was reserved (its {refused} line is out already):
      // the receiver goes on listening
      let report: Awaited<ReturnType<typeof rx.next>>;
      for (;;) {
        try {
          report = await rx.next();
          break;
        } catch (e) {
          if (!isRefusedBeforeReserving(e)) throw e;
        }
      }
      if (report.mode === 'postcopy') allPresent(qemu, incoming);
      // this process's CPU from listening to the report (the guest it started is its own process)
      const cpu = process.cpuUsage(cpu0);
      const cpuS = { user: +(cpu.user / 1e6).toFixed(3), system: +(cpu.system / 1e6).toFixed(3) };
      process.stdout.write(JSON.stringify({ received: report, guest_pid: guestPid || incoming?.pid || 0, cpu_s: cpuS }) + '\n');
      if (!report.confirmed) await linger(rx, lingerMs, 'the source did not confirm it heard ACTIVATED');
      return 0;
    } catch (e) {
      const err = e as LivemigError;
      // post-copy that cannot finish: the guest here runs on pages of which some exist nowhere
      // any more (they were only at the source). It cannot go on; it is stopped, and said so.
      const lost = err.phase === 'postcopy' && (incoming ?? qemu) !== undefined;
      if (lost) (incoming ?? qemu)!.kill();
      process.stdout.write(
        JSON.stringify({
          error: { code: err.code, phase: err.phase, message: err.message },
          ...(lost ? { destination_guest: 'stopped: its missing pages were lost' } : {}),
        }) + '\n',
      );
      // after COMMIT the source may be asking what happened: the answer is 'not activated'
      if (mayBeAskedAbout(err)) await linger(rx, lingerMs, 'the migration failed after the device state: the source may ask whether it activated');
      return 1;
    } finally {
      incoming?.close(); // a guest told to run runs on; one that was not exits
      qemu?.close();
      await rx.close();
    }
  },
};

/** --disk-dir (absolute for QEMU, whose command line gets the images' paths) and, for QEMU, the check of the source's disks. */
function receiveDisks(v: FlagValues, qemu: ReturnType<typeof qemuDiskPlaces> | undefined): Pick<ReceiveOptions, 'disks' | 'acceptDisks'> {
  const dir = typeof v['disk-dir'] === 'string' ? diskDir(v['disk-dir']) : undefined;
  return {
    ...(dir !== undefined ? { disks: { dir: qemu ? path.resolve(dir) : dir, ...keepDisks(v) } } : {}),
    ...(qemu ? { acceptDisks: qemu.accept } : {}),
  };
}

/** why a QEMU VM's disks come by pre-copy only: a QEMU reads its images as it starts (a virtio disk's geometry from its first sector) */
const QEMU_DISKS_BY_PRECOPY =
  "a QEMU destination reads its disks' first blocks as it starts, before any block could be fetched: its disks come by pre-copy only so far";

/** --qemu-exec (not with --guest-exec) and the disks its line places: their images go in --disk-dir, which it then needs. */
function qemuDiskPlacesOf(v: FlagValues): ReturnType<typeof qemuDiskPlaces> {
  if (typeof v['guest-exec'] === 'string') throw usageError('--qemu-exec starts a QEMU VM: not with --guest-exec');
  let places: ReturnType<typeof qemuDiskPlaces>;
  try {
    places = qemuDiskPlaces(str(v, 'qemu-exec'));
  } catch (e) {
    throw usageError(`--qemu-exec: ${(e as Error).message}`);
  }
  if (places.names.length && typeof v['disk-dir'] !== 'string')
    throw usageError(`--qemu-exec places disk(s) ${places.names.join(', ')}: --disk-dir DIR says where their images are created`);
  const dirRefusal = places.names.length ? unplainPath(path.resolve(str(v, 'disk-dir'))) : undefined;
  if (dirRefusal) throw usageError(`--disk-dir: ${dirRefusal}`);
  return places;
}

/** One line for each source refused here: where from, why, and the code. */
export function printRefusal(r: Refusal): void {
  process.stdout.write(JSON.stringify({ refused: r }) + '\n');
}

/** Keeps answering RESOLVE (and nothing else) for a while, so that the source can learn the outcome. */
async function linger(rx: Receiver, ms: number, why: string): Promise<void> {
  if (ms <= 0) return;
  rx.refuseMigrations();
  process.stdout.write(JSON.stringify({ lingering: { seconds: ms / 1000, reason: why } }) + '\n');
  const answered = await rx.nextResolve(ms);
  process.stdout.write(JSON.stringify({ lingered: { resolved: answered } }) + '\n');
}

/** An operator's command line, run by the shell (which `exec`s it, so the guest's pid is its own). */
export function shellCommand(line: string): string[] {
  if (line.trim().length === 0) throw usageError('--guest-exec needs a command');
  if (!line.includes('{socket}')) throw usageError("--guest-exec: the command must name its socket with {socket}, e.g. 'my-vmm --incoming {socket}'");
  return ['/bin/sh', '-c', `exec ${line}`];
}
