/**
 * A pre-shared key that differs shows only as OpenSSL's words for the failed handshake ("sslv3
 * alert bad record mac", "alert number 20"): the side that cannot open the other's Finished
 * sends bad_record_mac, a server that knows no such identity sends unknown_psk_identity. These
 * are the TLS alerts a PSK mismatch produces; here they become "the pre-shared keys differ".
 * The source hears nothing more than the alert (the destination says nothing else to a peer
 * that did not prove the key).
 */
import { LivemigError } from '../errors.js';
import { markRefusal } from '../refusals.js';

/** What of a side's credentials the words need: whether they are a PSK, and its identity (tls.ts's Credentials fit). */
type KeyedBy = { kind: 'cert' } | { kind: 'psk'; identity: string };

/** OpenSSL's codes (as Node names them) for a Finished that did not open under our key. */
const KEY_DIFFERS = new Set([
  'ERR_SSL_SSLV3_ALERT_BAD_RECORD_MAC',
  'ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC',
  'ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR',
  'ERR_SSL_DECRYPTION_FAILED',
]);
/** ... and for an identity the server has no key for */
const IDENTITY_UNKNOWN = new Set(['ERR_SSL_TLSV1_ALERT_UNKNOWN_PSK_IDENTITY', 'ERR_SSL_PSK_IDENTITY_NOT_FOUND']);

const codeOf = (e: Error): string => String((e as { code?: unknown }).code ?? '');

/** The source's error for a TLS failure that says our pre-shared keys differ; undefined otherwise. */
export function pskRefusalAtSource(creds: KeyedBy, e: Error): LivemigError | undefined {
  if (creds.kind !== 'psk') return undefined;
  const code = codeOf(e);
  const why = IDENTITY_UNKNOWN.has(code)
    ? `the destination has no key for the identity '${creds.identity}'`
    : KEY_DIFFERS.has(code)
      ? `the handshake did not verify under the destination's key for '${creds.identity}'`
      : undefined;
  if (!why) return undefined;
  const err = new LivemigError('ERR_LIVEMIG_AUTH', `the pre-shared keys differ: ${why} (check --psk-file on both sides)`, { phase: 'handshake', cause: e });
  return markRefusal(err, 'psk-mismatch');
}

/**
 * The destination's words for a TLS failure that says the source's pre-shared key differs from
 * ours; undefined otherwise. `identity` is what the source named: unauthenticated, so it is shown
 * quoted and cut short.
 */
export function pskRefusalAtDestination(creds: KeyedBy, e: Error, identity: string | undefined): string | undefined {
  if (creds.kind !== 'psk') return undefined;
  const named = identity === undefined ? 'no identity' : `the identity ${JSON.stringify(identity.slice(0, 64))}`;
  if (identity !== undefined && identity !== creds.identity) return `the pre-shared keys differ: the source named ${named}, which has no key here`;
  if (KEY_DIFFERS.has(codeOf(e)) || IDENTITY_UNKNOWN.has(codeOf(e))) return `the pre-shared keys differ: the source's key for ${named} is not ours`;
  return undefined;
}
