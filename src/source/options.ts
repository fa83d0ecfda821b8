/** The source's options, checked once with exact messages and resolved to their defaults. */
import { diskBytes } from '../disk/spec.js';
import net from 'node:net';
import { GUEST_NAME, GuestLayout } from '../guest/layout.js';
import { LivemigError } from '../errors.js';
import { assertSecureEnough } from '../security/tls.js';
import type { StallAction } from '../precopy/policy.js';
import type { MigrateOptions } from './types.js';
import { checkChannels } from './channels.js';

const STALL_ACTIONS: readonly StallAction[] = ['throttle', 'postcopy', 'force', 'abort'];
const MODES = ['precopy', 'postcopy', 'hybrid'] as const;
export type Mode = (typeof MODES)[number];

export interface Settings {
  readonly options: MigrateOptions;
  readonly downtimeLimitMs: number;
  readonly maxRounds: number;
  readonly maxBytes: number;
  readonly onStall: StallAction;
  readonly batchPages: number;
  readonly mode: Mode;
  /** post-copy may be needed: planned, the stall policy's choice, or on request */
  readonly mayPostcopy: boolean;
  readonly encodings: { zero: boolean; dedup: boolean; compress: boolean };
  readonly handshakeTimeoutMs: number;
  readonly recoverTimeoutMs: number;
  readonly progressTimeoutMs: number;
  readonly maxPauseMs: number;
  readonly resolveTimeoutMs: number;
  readonly layout: GuestLayout;
}

export const invalid = (m: string): LivemigError => new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', m, { phase: 'validate' });

export function resolveOptions(options: MigrateOptions): Settings {
  const { region } = options;
  const downtimeLimitMs = options.downtimeLimitMs ?? 50;
  const maxRounds = options.maxRounds ?? 30;
  const maxBytes = options.maxBytes ?? 3 * region.size;
  const onStall: StallAction = options.onStall ?? (options.throttle ? 'throttle' : 'force');
  const batchPages = Math.max(1, Math.floor((options.batchBytes ?? 1 << 20) / region.pageSize));
  if (!(downtimeLimitMs > 0)) throw invalid('downtimeLimitMs must be a positive number');
  if (!Number.isInteger(maxRounds) || maxRounds < 1) throw invalid('maxRounds must be a positive integer');
  if (!(maxBytes > 0)) throw invalid('maxBytes must be a positive number');
  if (batchPages > 4096) throw invalid('batchBytes must be at most 4096 pages');
  if (!STALL_ACTIONS.includes(onStall)) throw invalid(`onStall must be one of ${STALL_ACTIONS.join(', ')}, got ${String(onStall)}`);
  if (onStall === 'throttle' && !options.throttle) throw invalid("onStall 'throttle' needs a throttle(percent) callback to slow the guest");
  if (options.bandwidthMiBps !== undefined && !(options.bandwidthMiBps > 0)) throw invalid('bandwidthMiBps must be a positive number');
  if (options.postcopyBandwidthMiBps !== undefined && !(options.postcopyBandwidthMiBps > 0)) throw invalid('postcopyBandwidthMiBps must be a positive number');
  if (options.deadlineMs !== undefined && !(options.deadlineMs > 0)) throw invalid('deadlineMs must be a positive number');
  const mode = options.mode ?? 'precopy';
  if (!MODES.includes(mode)) throw invalid(`mode must be one of ${MODES.join(', ')}, got ${String(mode)}`);
  if (options.recoverTimeoutMs !== undefined && !(options.recoverTimeoutMs > 0)) throw invalid('recoverTimeoutMs must be a positive number');
  for (const k of ['progressTimeoutMs', 'maxPauseMs', 'handshakeTimeoutMs', 'resolveTimeoutMs'] as const) {
    const v = options[k];
    if (v !== undefined && !(Number.isFinite(v) && v > 0)) throw invalid(`${k} must be a positive number of milliseconds, got ${String(v)}`);
  }
  const layout = options.layout ?? GuestLayout.single(region.size - diskBytes(options.disks));
  if (!(layout instanceof GuestLayout)) throw invalid('layout must be a GuestLayout (GuestLayout.of(regions))');
  if (options.local) {
    if (mode !== 'precopy' || onStall === 'postcopy') throw invalid('a same-host upgrade (local) moves no page: post-copy does not apply');
    if (!Array.isArray(options.local.pieces) || options.local.pieces.length !== layout.regions.length)
      throw invalid(`local needs a piece (fd, offset, size) per region: ${layout.regions.length}`);
    options.local.pieces.forEach((p, i) => {
      if (p.size !== layout.regions[i]!.size) throw invalid(`local piece ${i} is ${p.size} bytes, its region ${layout.regions[i]!.size}`);
    });
  }
  if (options.untracked && (options.target || options.tracker)) throw invalid('untracked excludes target and tracker');
  if (layout.bytes + diskBytes(options.disks) !== region.size) throw invalid(`layout covers ${layout.bytes} bytes, the region holds ${region.size}`);
  if (!(options.to instanceof net.Socket)) assertSecureEnough(options.to.host, options.credentials, options.insecure, 'migrating to');
  checkChannels(options.channels);
  if (options.readPath !== undefined && !['auto', 'mapping', 'files'].includes(options.readPath))
    throw invalid(`readPath must be auto, mapping or files, got ${String(options.readPath)}`);
  if (options.guestName !== undefined && !GUEST_NAME.test(options.guestName)) throw invalid('guestName must be 1..63 characters of [A-Za-z0-9._-]');
  const ra = options.rateAdaptation;
  if (ra && !(ra.startMiBps > 0 && ra.incrementMiBps >= 0)) throw invalid('rateAdaptation needs startMiBps > 0 and incrementMiBps >= 0');
  return {
    options,
    downtimeLimitMs,
    maxRounds,
    maxBytes,
    onStall,
    batchPages,
    mode,
    mayPostcopy: mode !== 'precopy' || onStall === 'postcopy' || options.control !== undefined,
    // a same-host upgrade sends no page: nothing to encode
    encodings: options.local
      ? { zero: false, dedup: false, compress: false }
      : { zero: options.encodings?.zero ?? true, dedup: options.encodings?.dedup ?? true, compress: options.encodings?.compress ?? true },
    handshakeTimeoutMs: options.handshakeTimeoutMs ?? 60_000,
    recoverTimeoutMs: options.recoverTimeoutMs ?? 60_000,
    progressTimeoutMs: options.progressTimeoutMs ?? 30_000,
    maxPauseMs: options.maxPauseMs ?? 5_000,
    resolveTimeoutMs: options.resolveTimeoutMs ?? 30_000,
    layout,
  };
}
