/**
 * A test CA for trying certificates out (`livemig keys ca`, `livemig demo --secure`, the tests):
 * an EC P-256 CA and, per name, a key and a certificate it signed (CN and subjectAltName DNS
 * both the name), made by the `openssl` command. Node has no API that issues certificates, and
 * a certificate is not something to hand-roll. A production deployment's CA issues real ones.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LivemigError, invalidArgument } from '../errors.js';

export interface TestCa {
  /** the CA's certificate and key (PEM) */
  ca: Buffer;
  caKey: Buffer;
  /** per name: its certificate and key (PEM) */
  certs: Record<string, { cert: Buffer; key: Buffer }>;
}

const NAME = /^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$/;

/** Why the test CA cannot be made here, or undefined when it can. */
export function opensslMissing(): string | undefined {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'the openssl command is not installed (it makes the test CA; apt-get install openssl)';
  }
}

/** Checks names before they reach openssl's -subj: host-name characters only. */
export function checkCertNames(names: readonly string[]): void {
  if (names.length === 0) throw invalidArgument('a test CA needs at least one name');
  for (const n of names) if (!NAME.test(n)) throw invalidArgument(`certificate name '${n}' must be 1..63 letters, digits, '.' or '-' (a host name)`);
  if (new Set(names).size !== names.length) throw invalidArgument('certificate names must differ');
}

export function makeTestCa(names: readonly string[], days = 30): TestCa {
  checkCertNames(names);
  if (!Number.isInteger(days) || days < 1 || days > 3650) throw invalidArgument(`days must be an integer within 1..3650, got ${days}`);
  const missing = opensslMissing();
  if (missing) throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `cannot make a test CA: ${missing}`, { phase: 'validate' });
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-ca-')); // mode 0700: the keys stay private
  const openssl = (...args: string[]): void => {
    try {
      execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
    } catch (e) {
      const stderr = String((e as { stderr?: Buffer }).stderr ?? '').trim();
      throw new LivemigError('ERR_LIVEMIG_UNSUPPORTED', `openssl ${args[0]} failed: ${stderr || (e as Error).message}`, { phase: 'validate', cause: e });
    }
  };
  try {
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
    openssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', String(days), '-subj', '/CN=livemig test CA');
    const certs: TestCa['certs'] = {};
    for (const n of names) {
      openssl('req', ...ec, '-keyout', `${n}.key`, '-out', `${n}.csr`, '-subj', `/CN=${n}`);
      writeFileSync(path.join(dir, `${n}.ext`), `subjectAltName=DNS:${n}\n`);
      openssl(
        'x509',
        '-req',
        '-in',
        `${n}.csr`,
        '-CA',
        'ca.crt',
        '-CAkey',
        'ca.key',
        '-CAcreateserial',
        '-out',
        `${n}.crt`,
        '-days',
        String(days),
        '-extfile',
        `${n}.ext`,
      );
      certs[n] = { cert: readFileSync(path.join(dir, `${n}.crt`)), key: readFileSync(path.join(dir, `${n}.key`)) };
    }
    return { ca: readFileSync(path.join(dir, 'ca.crt')), caKey: readFileSync(path.join(dir, 'ca.key')), certs };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Writes a test CA into `dir` (which must exist): ca.crt, ca.key, and NAME.crt, NAME.key per
 * name; keys readable by their owner only. Refuses to overwrite any file. Returns the paths.
 */
export function writeTestCa(dir: string, ca: TestCa): string[] {
  const files: [string, Buffer, number][] = [
    ['ca.crt', ca.ca, 0o644],
    ['ca.key', ca.caKey, 0o600],
    ...Object.entries(ca.certs).flatMap(([n, c]): [string, Buffer, number][] => [
      [`${n}.crt`, c.cert, 0o644],
      [`${n}.key`, c.key, 0o600],
    ]),
  ];
  const taken = files.map(([name]) => path.join(dir, name)).filter((p) => existsSync(p));
  if (taken.length) throw invalidArgument(`will not overwrite ${taken.join(', ')}: choose an empty directory`);
  const written: string[] = [];
  for (const [name, data, mode] of files) {
    const p = path.join(dir, name);
    try {
      writeFileSync(p, data, { flag: 'wx', mode });
    } catch (e) {
      throw invalidArgument(`cannot write ${p}: ${(e as Error).message}${written.length ? ` (already written: ${written.join(', ')})` : ''}`);
    }
    written.push(p);
  }
  return written;
}
