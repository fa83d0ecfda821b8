/** livemig demo: a reference guest migrated live on loopback, and the report. */
import { runDemo, type DemoReport } from '../../demo/demo.js';
import { runDaemonDemo, type DaemonDemoReport } from '../../demo/daemon-demo.js';
import { runQemuDemo, type QemuDemoReport } from '../../demo/qemu-demo.js';
import { ProgressBar, type ShownProgress } from '../progress-bar.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import {
  DISK_FLAGS,
  GUEST_FLAGS,
  POLICY_FLAGS,
  diskSpec,
  downtimeLimit,
  encodingFlags,
  guestSpec,
  maxRounds,
  policyFlags,
  printProgress,
} from '../migration-flags.js';

export const demo: Command = {
  name: 'demo',
  summary: 'migrate a live reference guest on loopback and report',
  synopsis: '[flags]',
  description: [
    'Starts a reference guest (1 GiB of mixed content writing 64 MiB/s, a heartbeat every',
    'millisecond), a receiver (`livemig receive`, its own process) and a sender on loopback,',
    'migrates the guest live and prints rounds, total time, downtime, the largest heartbeat gap',
    'the guest showed, bytes on the wire and the verified digest. The destination guest then',
    'checks every page against its model of what it wrote. Exits 1 if anything did not verify.',
    'With --secure both sides authenticate with certificates from a fresh test CA (mutual TLS',
    '1.3; needs the openssl command) and every byte after the handshake is encrypted.',
    'With --daemon the same migration goes through the service path: two `livemig serve`',
    'daemons, the guest registered with one, the migration asked for over its HTTP API and',
    'followed by its events (a progress bar on a terminal).',
    'With --disk SIZE the guest has a disk image too (in a temporary directory), written at',
    '--disk-rate while it moves; livemig moves it with the memory, and the destination guest',
    'checks every block of it.',
    'With --qemu the guest is a real VM: a small Linux guest (built from Debian packages by',
    'contrib/qemu-guest/build.sh) in QEMU (TCG), its RAM on a shared file and the preload library',
    'loaded; `livemig receive --qemu-exec` and `livemig send --qemu` move it (docs/QEMU.md) and the',
    'VM checks every page it wrote at the destination. Needs qemu-system-x86_64 and apt-get.',
  ].join('\n'),
  flags: {
    ...GUEST_FLAGS,
    ...DISK_FLAGS,
    ...POLICY_FLAGS,
    secure: { type: 'boolean', default: false, help: 'mutual TLS from a fresh test CA, and an encrypted stream' },
    local: { type: 'boolean', default: false, help: "same-host upgrade: the guest's memory files go to the destination guest, nothing is copied" },
    daemon: { type: 'boolean', default: false, help: 'through two `livemig serve` daemons and their HTTP API' },
    qemu: { type: 'boolean', default: false, help: 'a QEMU VM (512 MiB, writing 64 MiB/s of its RAM) instead of the reference guest' },
    prealloc: { type: 'boolean', default: false, help: "the receiver touches the guest's memory before its first page (`livemig receive --prealloc`)" },
    guest: {
      type: 'string',
      default: 'reference',
      value: 'reference|c',
      help: 'the guest to migrate: the reference guest, or the C example guest (two regions, 192 + 64 MiB; --size does not apply)',
    },
  },
  async run(v: FlagValues): Promise<number> {
    if (v['qemu'] === true) return qemuDemo(v);
    const disk = diskSpec(v);
    const g = { ...guestSpec(v), ...(disk ? { disk } : {}) };
    const kind = str(v, 'guest');
    if (kind !== 'reference' && kind !== 'c') throw usageError(`--guest must be reference or c, got '${kind}'`);
    const json = v['json'] === true;
    const secure = v['secure'] === true;
    if (v['daemon'] === true) {
      if (secure || v['local'] === true || v['prealloc'] === true || kind !== 'reference' || disk)
        throw usageError('--daemon runs the reference guest, without --secure, --local, --prealloc and --disk');
      if (!json)
        process.stderr.write(
          `livemig demo: ${(g.size / 2 ** 20).toFixed(0)} MiB ${g.content} guest writing ${g.rate} MiB/s ${g.pattern}, through two daemons on loopback\n`,
        );
      const bar = json ? undefined : new ProgressBar();
      const r = await runDaemonDemo({
        guest: guestSpec(v),
        downtimeLimitMs: downtimeLimit(v),
        ...(policyFlags(v).mode ? { mode: policyFlags(v).mode! } : {}),
        ...(bar
          ? {
              onEvent: (e) =>
                e.event === 'progress'
                  ? bar.show(e.data as unknown as ShownProgress)
                  : e.event === 'state'
                    ? bar.line(`state ${String(e.data['state'])}`)
                    : undefined,
            }
          : {}),
      });
      bar?.end();
      process.stdout.write(json ? JSON.stringify(r) + '\n' : describeDaemon(r));
      return r.verified ? 0 : 1;
    }
    if (!json && kind === 'c')
      process.stderr.write(
        `livemig demo: the C example guest (regions of 192 and 64 MiB) writing ${g.rate} MiB/s, loopback${secure ? ', mutual TLS from a fresh test CA' : ''}\n`,
      );
    else if (!json)
      process.stderr.write(
        `livemig demo: ${(g.size / 2 ** 20).toFixed(0)} MiB ${g.content} guest writing ${g.rate} MiB/s ${g.pattern}, ` +
          `loopback${secure ? ', mutual TLS from a fresh test CA' : ''}\n`,
      );
    const r = await runDemo({
      guest: g,
      downtimeLimitMs: downtimeLimit(v),
      maxRounds: maxRounds(v),
      encodings: encodingFlags(v),
      policy: policyFlags(v),
      secure,
      guestKind: kind,
      local: v['local'] === true,
      ...(v['prealloc'] === true ? { receiverArgs: ['--prealloc'] } : {}),
      ...(json ? {} : { onProgress: printProgress }),
    });
    process.stdout.write(json ? JSON.stringify(r) + '\n' : describe(r));
    return r.verified ? 0 : 1;
  },
};

async function qemuDemo(v: FlagValues): Promise<number> {
  if (v['daemon'] === true || v['secure'] === true || v['local'] === true || diskSpec(v))
    throw usageError('--qemu runs a QEMU VM on loopback: not with --daemon, --secure, --local or --disk');
  const json = v['json'] === true;
  if (!json) process.stderr.write('livemig demo: booting a 512 MiB Linux VM in QEMU (TCG), its workload writing 64 MiB/s of its RAM\n');
  const r = await runQemuDemo();
  process.stdout.write(json ? JSON.stringify(r) + '\n' : describeQemu(r));
  return r.verified ? 0 : 1;
}

function describeQemu(r: QemuDemoReport): string {
  return (
    [
      `verified: ${r.verified ? 'yes' : 'NO'} (the VM checked its ${r.guest_check.pages} pages at the destination: ${r.guest_check.bad} wrong)`,
      `QEMU: ${r.qemu}; tracking: ${r.tracker_reason}`,
      `rounds: ${r.rounds}; total time: ${r.total_ms.toFixed(0)} ms; ` +
        `bytes on the wire: ${(r.wire_bytes / 2 ** 20).toFixed(1)} MiB for ${r.vm.mem_mib} MiB of RAM`,
      `downtime (STOP to cont): ${r.downtime_ms.toFixed(2)} ms; the VM's heartbeats stopped for ${r.guest_gap_ms.toFixed(2)} ms (host clock)`,
      `the VM runs on at the destination (pid ${r.destination_pid}), stopped when the demo ends`,
    ].join('\n') + '\n'
  );
}

function describeDaemon(r: DaemonDemoReport): string {
  return (
    [
      `verified: ${r.verified ? 'yes' : 'NO'} (digest ${r.digest}; guest checked every page: ${r.guest_verified.bad} wrong after ` +
        `${r.guest_verified.writes} writes)`,
      `through: ${r.daemons}; migration ${r.migration.id} ${r.migration.state} (destination lists ${r.destination.id} ${r.destination.state})`,
      `events seen: ${Object.entries(r.events)
        .map(([k, n]) => `${n} ${k}`)
        .join(', ')}`,
      `rounds: ${r.rounds}, then stop-and-copy of ${r.stop_and_copy.pages} pages`,
      `total time (first page to activation): ${r.total_ms.toFixed(0)} ms`,
      `downtime (pause to activation): ${r.downtime_ms.toFixed(2)} ms; largest heartbeat gap: ${r.guest_gap_ms.toFixed(2)} ms`,
      `bytes on the wire: ${(r.wire_bytes / 2 ** 20).toFixed(1)} MiB for a ${(r.region_bytes / 2 ** 20).toFixed(1)} MiB region`,
    ].join('\n') + '\n'
  );
}

function describe(r: DemoReport): string {
  const mib = (b: number): string => `${(b / 2 ** 20).toFixed(1)} MiB`;
  const dp = r.destination_postcopy;
  return (
    [
      `verified: ${r.verified ? 'yes' : 'NO'} (digest ${r.digest}; guest checked every page: ${r.guest_verified.bad} wrong after ` +
        `${r.guest_verified.writes} writes)`,
      r.local
        ? `same-host upgrade: the guest's memory went by reference (${r.regions.length} region${r.regions.length > 1 ? 's' : ''}), no page copied; ` +
          `only the device state moved`
        : r.postcopy
          ? `mode: ${r.mode}; ${r.rounds} pre-copy rounds, then post-copy of ${r.postcopy.pages_needed} pages (${r.postcopy.pages_pushed} pushed, ` +
            `${r.postcopy.pages_served} on request; ${r.postcopy.reconnects} reconnections)`
          : `rounds: ${r.rounds}, then stop-and-copy of ${r.stop_and_copy.pages} pages`,
      ...(dp
        ? [
            `faults at the destination: ${dp.faults}, latency p50 ${dp.fault_latency_p50_us} us, p99 ${dp.fault_latency_p99_us} us; guest blocked ` +
              `${dp.blocked_ms} ms in total`,
          ]
        : []),
      `preparation (handshake + reservation): ${r.prep_ms.toFixed(0)} ms`,
      r.postcopy
        ? `total time (first page to the destination holding every page): ${r.total_ms.toFixed(0)} ms`
        : `total time (first page to activation): ${r.total_ms.toFixed(0)} ms`,
      `downtime (pause to activation): ${r.downtime_ms.toFixed(2)} ms; ` +
        (r.downtime_limit_met ? `within the ${r.downtime_limit_ms} ms limit` : `OVER the ${r.downtime_limit_ms} ms limit: ${r.downtime_limit_missed}`),
      ...(r.guest_downtime_ms !== undefined
        ? [`downtime as the guest felt it (its beats either side of the pause): ${r.guest_downtime_ms.toFixed(2)} ms`]
        : []),
      `largest heartbeat gap from the first page on: ${r.guest_gap_ms.toFixed(2)} ms (during preparation: ${r.guest_gap_preparation_ms.toFixed(2)} ms)`,
      `bytes on the wire: ${mib(r.wire_bytes)} for a ${mib(r.region_bytes)} region (${r.pages_sent} pages sent` +
        `${r.hole_pages ? `, ${r.hole_pages} never written by the guest and not read` : ''})`,
      `memory: ${r.backing.kind}, ${r.backing.page_size / 1024} KiB pages, a write tracked per ${r.backing.tracking_page_size / 1024} KiB ` +
        '(4 KiB pages on the wire)',
      `security: ${r.security.auth === 'none' ? 'none (loopback, unauthenticated)' : `${r.security.auth}, peer ${r.security.peer}, ${r.security.cipher}`}; ` +
        `pages ${r.security.encrypted ? 'encrypted (AES-256-GCM records keyed from the TLS session)' : 'not encrypted'}`,
      `encodings: ${
        r.encodings
          ? `${r.zero_pages} zero, ${r.dup_pages} dup, ${r.lz4_pages} lz4 (ratio ${r.lz4_ratio}), ${r.raw_pages} raw, ${r.skipped_pages} already there`
          : 'off'
      }`,
    ].join('\n') + '\n'
  );
}
