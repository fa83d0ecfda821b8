/**
 * Why a destination refused a source, in a bounded set of words: the reason a refusal is
 * logged, traced, counted (one metric label value each) and recorded under. The place that
 * refuses marks its error with the reason when the code alone does not say it (an
 * ERR_LIVEMIG_AUTH may be a name not admitted, a key that differs, or a scan hanging up);
 * everything else is told by its code.
 *
 * This module imports no module that traces (the trace catalogue names its reasons).
 */
import type { ErrorCode } from './errors.js';

export const REFUSAL_REASONS = [
  /** the source's certificate chains to our CA, but its name is not in --allow */
  'peer-not-allowed',
  /** the source's certificate does not chain to our CA, or it presented none */
  'certificate-untrusted',
  /** the pre-shared keys (or their identities) differ */
  'psk-mismatch',
  /** any other failed TLS handshake, or a record that failed authentication */
  'authentication',
  /** no handshake or first frame within the deadline */
  'timeout',
  /** the peer hung up before its first frame (a scan, a source that gave up) */
  'closed',
  /** a first frame the protocol does not allow */
  'protocol',
  /** no protocol version both sides speak (or one too old for credentials) */
  'version',
  /** the region does not fit the limit, the host or the memory budget */
  'memory',
  /** the most migrations at once are running here */
  'busy',
  /** this receiver takes no more migrations (it is shutting down, or served its one) */
  'closing',
  /** anything else HELLO asked that this destination does not do (page size, same-host offer) */
  'admission',
] as const;

export type RefusalReason = (typeof REFUSAL_REASONS)[number];

/** One refusal at the destination, as it is logged and recorded. */
export interface Refusal {
  /** where the source connected from (address:port) */
  from: string;
  reason: RefusalReason;
  code: ErrorCode;
  phase: string;
  /** the destination's own words (never sent to an unauthenticated source) */
  message: string;
  /** the source's certificate name, when its certificate chains to our CA */
  peer?: string;
}

const marks = new WeakMap<object, { reason: RefusalReason; peer?: string }>();

/** Marks `e` as a refusal for `reason` (with the source's verified name, if any); returns it. */
export function markRefusal<E extends object>(e: E, reason: RefusalReason, peer?: string): E {
  marks.set(e, peer === undefined ? { reason } : { reason, peer });
  return e;
}

const BY_CODE: Partial<Record<ErrorCode, RefusalReason>> = {
  ERR_LIVEMIG_AUTH: 'authentication',
  ERR_LIVEMIG_TIMEOUT: 'timeout',
  ERR_LIVEMIG_CONNECTION: 'closed',
  ERR_LIVEMIG_PROTOCOL: 'protocol',
  ERR_LIVEMIG_FRAME_TOO_LARGE: 'protocol',
  ERR_LIVEMIG_PAGE_INDEX: 'protocol',
  ERR_LIVEMIG_VERSION: 'version',
  ERR_LIVEMIG_NO_MEMORY: 'memory',
};

/** The refusal `e` was, for a source that connected from `from`. */
export function refusalOf(e: unknown, from: string): Refusal {
  const err = (typeof e === 'object' && e !== null ? e : new Error(String(e))) as { code?: unknown; phase?: unknown; message?: unknown };
  const code = (typeof err.code === 'string' && err.code.startsWith('ERR_LIVEMIG_') ? err.code : 'ERR_LIVEMIG_ABORTED') as ErrorCode;
  const mark = marks.get(err);
  return {
    from,
    reason: mark?.reason ?? BY_CODE[code] ?? 'admission',
    code,
    phase: typeof err.phase === 'string' ? err.phase : 'handshake',
    message: typeof err.message === 'string' ? err.message : String(e),
    ...(mark?.peer !== undefined ? { peer: mark.peer } : {}),
  };
}

/**
 * What the destination tells a source whose certificate it refused after the TLS handshake: the
 * TLS record `LMNO` and one byte, the category. Nothing more goes to a peer we did not admit:
 * the source puts its own name in the words (refusedCertificateWords).
 */
export const CERT_REFUSAL = { notAllowed: 1, untrusted: 2 } as const;

/** The source's words for the destination's `LMNO` category; `ownName` is its certificate's name. */
export function refusedCertificateWords(category: number, ownName: string): string {
  if (category === CERT_REFUSAL.notAllowed) return `the destination refused this source: the source's certificate name '${ownName}' is not in --allow`;
  if (category === CERT_REFUSAL.untrusted)
    return "the destination refused this source: the source's certificate is not signed by a CA the destination trusts (its --tls-ca)";
  return `the destination refused this source's certificate (reason ${category}, unknown to this version)`;
}
