/**
 * Test certificates for the tests: src/security/test-ca.ts (the openssl command), valid a day.
 * `opensslMissing` is the reason to skip where the command is not installed.
 */
import { makeTestCa, opensslMissing as missing, type TestCa } from '../src/security/test-ca.js';

export const opensslMissing: string | undefined = missing();

export function makeCa(names: string[]): TestCa {
  return makeTestCa(names, 1);
}
