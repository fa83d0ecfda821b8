/** livemig keys: credentials: a pre-shared key or a test CA with certificates for the transfer pair, a token for the API. */
import { randomBytes } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { makeTestCa, writeTestCa } from '../../security/test-ca.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { writeSecretFile } from '../secret-file.js';

const KINDS = ['psk', 'token', 'ca'] as const;

export const keys: Command = {
  name: 'keys',
  summary: 'write a pre-shared key (--psk-file), an API token (--token-file), or a test CA and certificates (--tls-*)',
  synopsis: 'psk --out FILE [--identity NAME] | token --out FILE | ca --out DIR --names NAME[,NAME...] [--days N]',
  description: [
    'keys psk writes a new random 32-byte key as IDENTITY:HEXKEY to FILE, readable by its owner',
    'only (mode 0600), for `livemig send --psk-file FILE` and `livemig receive --psk-file FILE`:',
    'copy it to both hosts over a channel you trust. It never overwrites a file.',
    '',
    'keys token writes a new random API token (32 bytes in hex) to FILE, mode 0600, for',
    "`livemig serve --token-file FILE` and the clients' --token-file (or LIVEMIG_TOKEN_FILE):",
    'copy it to where the clients run over a channel you trust. It never overwrites a file.',
    '',
    'keys ca writes a TEST CA into DIR (made, mode 0700, when missing): ca.crt and ca.key, and',
    "for each name NAME.crt and NAME.key (EC P-256; the name is the certificate's CN and DNS",
    'name; keys mode 0600), made with the openssl command. Then, with --names src,dst:',
    '  livemig receive --tls-cert dst.crt --tls-key dst.key --tls-ca ca.crt --allow src ...',
    '  livemig send --tls-cert src.crt --tls-key src.key --tls-ca ca.crt --peer-name dst ...',
    "This is for trying certificates out. In production your CA issues the hosts' certificates",
    'and keeps its key elsewhere; never ship ca.key to a host. It never overwrites a file.',
  ].join('\n'),
  flags: {
    out: {
      type: 'string',
      value: 'FILE|DIR',
      help: 'psk, token: the file to write; ca: the directory to write into, made (0700) when missing (required; files must not exist)',
    },
    identity: { type: 'string', default: 'livemig', value: 'NAME', help: 'psk: the identity the source presents' },
    names: { type: 'string', value: 'NAME[,NAME...]', help: 'ca: a certificate per name (host-name characters)' },
    days: { type: 'string', default: '30', value: 'N', help: 'ca: how long the CA and certificates are valid' },
  },
  positionals: true,
  async run(v: FlagValues, rest: string[]): Promise<number> {
    const kind = rest[0] as (typeof KINDS)[number];
    if (rest.length !== 1 || !KINDS.includes(kind)) throw usageError(`keys needs what to make: one of ${KINDS.join(', ')}`);
    if (typeof v['out'] !== 'string') throw usageError(`keys ${kind} needs --out ${kind === 'ca' ? 'DIR' : 'FILE'}`);
    if (kind === 'token') return token(v['out']);
    return kind === 'psk' ? psk(v, v['out']) : ca(v, v['out']);
  },
};

function psk(v: FlagValues, out: string): number {
  const identity = str(v, 'identity');
  if (!/^[^:\s]{1,128}$/.test(identity)) throw usageError(`--identity must be 1..128 characters without ':' or spaces, got '${identity}'`);
  writeSecretFile(out, `${identity}:${randomBytes(32).toString('hex')}\n`);
  process.stdout.write(JSON.stringify({ written: out, identity, key_bytes: 32 }) + '\n');
  return 0;
}

/** An API bearer token: 32 random bytes in hex, as the daemon's --token-file reads it (one line, no spaces). */
function token(out: string): number {
  writeSecretFile(out, `${randomBytes(32).toString('hex')}\n`);
  process.stdout.write(JSON.stringify({ written: out, token_bytes: 32 }) + '\n');
  return 0;
}

function ca(v: FlagValues, dir: string): number {
  if (typeof v['names'] !== 'string') throw usageError('keys ca needs --names NAME[,NAME...]: a certificate per host, e.g. --names src,dst');
  const names = v['names'].split(',').map((n) => n.trim());
  const days = Number(str(v, 'days'));
  // made before the directory: names refused (or no openssl) leave nothing behind
  const made = makeTestCa(names, days);
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw usageError(`--out: cannot make the directory ${dir}: ${(e as Error).message}`);
  }
  const written = writeTestCa(dir, made);
  process.stdout.write(JSON.stringify({ written, names, days, note: 'a test CA: in production, certificates come from your CA' }) + '\n');
  return 0;
}
