/** The credentials flags of send and receive (src/security/tls.ts), read and checked. */
import { readFileSync } from 'node:fs';
import type { Credentials } from '../security/tls.js';
import { usageError, type FlagValues, type Flags } from './flags.js';
import { readSecretFile } from './secret-file.js';

export const SOURCE_SECURITY_FLAGS: Flags = {
  'tls-cert': { type: 'string', value: 'FILE', help: "this host's certificate (PEM): authenticate with certificates, TLS 1.3" },
  'tls-key': { type: 'string', value: 'FILE', help: 'its private key (PEM)' },
  'tls-ca': { type: 'string', value: 'FILE', help: "the CA the peer's certificate must chain to (PEM)" },
  'peer-name': { type: 'string', value: 'NAME', help: "the name the destination's certificate must carry" },
  'psk-file': {
    type: 'string',
    value: 'FILE',
    help: 'authenticate with a pre-shared key instead: a file only its owner can read (0600) holding IDENTITY:HEXKEY (32 bytes or more)',
  },
  insecure: { type: 'boolean', default: false, help: 'off loopback without credentials, on purpose (refused otherwise)' },
};

export const DESTINATION_SECURITY_FLAGS: Flags = {
  ...Object.fromEntries(Object.entries(SOURCE_SECURITY_FLAGS).filter(([k]) => k !== 'peer-name')),
  allow: { type: 'string', value: 'NAME[,NAME...]', help: 'the source certificate names admitted (with --tls-cert; required there)' },
};

function read(path: string, flag: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    throw usageError(`${flag}: cannot read ${path}: ${(e as Error).message}`);
  }
}

/** The credentials the flags give, or undefined when they give none. */
export function credentialsFrom(v: FlagValues, side: 'source' | 'destination'): Credentials | undefined {
  const str = (k: string): string | undefined => (typeof v[k] === 'string' ? (v[k] as string) : undefined);
  const cert = str('tls-cert');
  const key = str('tls-key');
  const ca = str('tls-ca');
  const psk = str('psk-file');
  if (psk !== undefined) {
    if (cert || key || ca) throw usageError('--psk-file and --tls-cert/--tls-key/--tls-ca are two ways to authenticate: give one');
    const m = /^([^:\s]{1,128}):([0-9a-fA-F]{64,})\s*$/.exec(readSecretFile(psk, '--psk-file').toString('utf8'));
    if (!m) throw usageError(`--psk-file: ${psk} must hold IDENTITY:HEXKEY, a key of at least 32 bytes in hex`);
    return { kind: 'psk', identity: m[1]!, key: Buffer.from(m[2]!, 'hex') };
  }
  if (cert === undefined && key === undefined && ca === undefined) {
    if (str('allow') !== undefined || str('peer-name') !== undefined)
      throw usageError(`--${str('allow') !== undefined ? 'allow' : 'peer-name'} needs --tls-cert, --tls-key and --tls-ca`);
    return undefined;
  }
  if (!cert || !key || !ca) throw usageError('certificates need all three of --tls-cert, --tls-key and --tls-ca');
  const base = { kind: 'cert' as const, cert: read(cert, '--tls-cert'), key: read(key, '--tls-key'), ca: read(ca, '--tls-ca') };
  if (side === 'destination') {
    const allow = str('allow')
      ?.split(',')
      .map((n) => n.trim())
      .filter((n) => n.length > 0);
    if (!allow || allow.length === 0) throw usageError('--tls-cert on the destination needs --allow NAME[,NAME...]: the source names it admits');
    return { ...base, allow };
  }
  const peerName = str('peer-name');
  if (!peerName) throw usageError("--tls-cert on the source needs --peer-name NAME: the destination's certificate name");
  return { ...base, peerName };
}
