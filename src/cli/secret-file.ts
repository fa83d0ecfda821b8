/** Secrets the CLI reads (a pre-shared key, an API token) and writes (`livemig keys psk|token`). */
import { closeSync, fstatSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { LivemigError } from '../errors.js';
import { usageError } from './flags.js';

/**
 * The bytes of a secret file, refused when anyone but its owner may read or change it: a key
 * that others can read is no secret any more, and one they can change is theirs. Checked on
 * the opened file, so what is checked is what is read. A pipe (`--psk-file <(...)`) is 0600.
 */
export function readSecretFile(file: string, flag: string): Buffer {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch (e) {
    throw usageError(`${flag}: cannot read ${file}: ${(e as Error).message}`);
  }
  try {
    const mode = fstatSync(fd).mode & 0o777;
    if ((mode & 0o077) !== 0)
      throw usageError(
        `${flag}: ${file} has mode 0${mode.toString(8)}: its group or others can ${mode & 0o044 ? 'read' : 'change'} the secret in it; ` +
          `make it its owner's only: chmod 600 ${file}`,
      );
    return readFileSync(fd);
  } catch (e) {
    if (e instanceof LivemigError) throw e;
    throw usageError(`${flag}: cannot read ${file}: ${(e as Error).message}`);
  } finally {
    closeSync(fd);
  }
}

/** Writes a new secret file, its owner's only (0600); an existing file is never overwritten. */
export function writeSecretFile(file: string, content: string): void {
  try {
    // 'wx': refuse an existing file; 0600: the content is a secret
    writeFileSync(file, content, { flag: 'wx', mode: 0o600 });
  } catch (e) {
    throw usageError(`--out: cannot write ${file}: ${(e as Error).message}`);
  }
}
