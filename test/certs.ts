/**
 * Test certificates from the openssl command: a CA and a certificate per name, signed by it.
 * `opensslMissing` is the reason to skip where the command is not installed.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const opensslMissing: string | undefined = (() => {
  try {
    execFileSync('openssl', ['version'], { stdio: 'ignore' });
    return undefined;
  } catch {
    return 'the openssl command is not installed (it makes the test certificates)';
  }
})();

export interface TestCa {
  ca: Buffer;
  certs: Record<string, { cert: Buffer; key: Buffer }>;
}

export function makeCa(names: string[]): TestCa {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'livemig-ca-'));
  const openssl = (...args: string[]): void => void execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
  try {
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
    openssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '1', '-subj', '/CN=livemig test CA');
    const certs: TestCa['certs'] = {};
    for (const n of names) {
      openssl('req', ...ec, '-keyout', `${n}.key`, '-out', `${n}.csr`, '-subj', `/CN=${n}`);
      writeFileSync(path.join(dir, `${n}.ext`), `subjectAltName=DNS:${n}\n`);
      openssl('x509', '-req', '-in', `${n}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial', '-out', `${n}.crt`, '-days', '1', '-extfile', `${n}.ext`);
      certs[n] = { cert: readFileSync(path.join(dir, `${n}.crt`)), key: readFileSync(path.join(dir, `${n}.key`)) };
    }
    return { ca: readFileSync(path.join(dir, 'ca.crt')), certs };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
