/** livemig keys: credentials for the transfer pair (a pre-shared key; certificates come from a CA). */
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { str, usageError, type Command, type FlagValues } from '../flags.js';

export const keys: Command = {
  name: 'keys',
  summary: 'write a pre-shared key file for send and receive (--psk-file)',
  synopsis: 'psk --out FILE [--identity NAME]',
  description: [
    'keys psk writes a new random 32-byte key as IDENTITY:HEXKEY to FILE, readable by its owner',
    'only (mode 0600), for `livemig send --psk-file FILE` and `livemig receive --psk-file FILE`:',
    'copy it to both hosts over a channel you trust. It never overwrites a file. Certificates',
    '(--tls-cert/--tls-key/--tls-ca) come from your CA; for a test CA, `openssl` makes one.',
  ].join('\n'),
  flags: {
    out: { type: 'string', value: 'FILE', help: 'where to write the key (required; must not exist)' },
    identity: { type: 'string', default: 'livemig', value: 'NAME', help: 'the identity the source presents' },
  },
  positionals: true,
  async run(v: FlagValues, rest: string[]): Promise<number> {
    if (rest.length !== 1 || rest[0] !== 'psk') throw usageError("keys needs what to make: 'livemig keys psk --out FILE' (see 'livemig keys --help')");
    if (typeof v['out'] !== 'string') throw usageError("keys psk needs --out FILE (see 'livemig keys --help')");
    const identity = str(v, 'identity');
    if (!/^[^:\s]{1,128}$/.test(identity)) throw usageError(`--identity must be 1..128 characters without ':' or spaces, got '${identity}'`);
    const out = v['out'];
    try {
      // 'wx': refuse an existing file; 0600: the key is a secret
      writeFileSync(out, `${identity}:${randomBytes(32).toString('hex')}\n`, { flag: 'wx', mode: 0o600 });
    } catch (e) {
      throw usageError(`--out: cannot write ${out}: ${(e as Error).message}`);
    }
    process.stdout.write(JSON.stringify({ written: out, identity, key_bytes: 32 }) + '\n');
    return 0;
  },
};
