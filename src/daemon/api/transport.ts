/**
 * How the daemon's API is served: a unix socket in plain HTTP (its file mode keeps others out),
 * TCP in HTTPS with the daemon's own certificate (the one its migration port presents), or TCP
 * in plain HTTP only when asked on purpose (`--insecure-api`) and on a loopback address. The
 * API moves, reads and activates guests: whoever can read or forge its traffic on a network
 * (the bearer token crosses it) owns them.
 */
import { LivemigError } from '../../errors.js';
import { isLoopback, type Credentials } from '../../security/tls.js';
import type { ApiTls } from './server.js';

export type ApiAddress = { path: string } | { host: string; port: number };

export interface ApiSecurity {
  /** the migration port's credentials: their certificate is the API's on TCP */
  credentials: Credentials | undefined;
  /** plain HTTP on TCP, on purpose: loopback only */
  insecureApi: boolean;
  /** on TCP, a client certificate our CA signed is required (mutual TLS) */
  requireClientCert: boolean;
}

const insecure = (message: string): LivemigError => new LivemigError('ERR_LIVEMIG_INSECURE', message, { phase: 'validate' });
const invalid = (message: string): LivemigError => new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', message, { phase: 'validate' });

/**
 * The TLS the API is served with: undefined for a unix socket and for --insecure-api on
 * loopback. Anything else that would be plain HTTP on TCP is refused, naming the fix.
 */
export function apiTls(api: ApiAddress, s: ApiSecurity): ApiTls | undefined {
  if ('path' in api) {
    if (s.requireClientCert) throw invalid('client certificates (--api-mtls) are for an API on TCP: a unix socket is plain HTTP, kept private by its mode');
    return undefined;
  }
  const where = `${api.host.includes(':') ? `[${api.host}]` : api.host}:${api.port}`;
  if (s.insecureApi) {
    if (!isLoopback(api.host))
      throw insecure(
        `--insecure-api serves the API in plain HTTP, which only a loopback address may carry, not ${where}: the bearer token and every guest ` +
          'operation would cross the network readable. Drop --insecure-api and serve HTTPS with the daemon certificate (--tls-cert/--tls-key/--tls-ca)',
      );
    if (s.requireClientCert) throw invalid('--api-mtls needs HTTPS: it cannot go with --insecure-api');
    return undefined;
  }
  if (s.credentials?.kind !== 'cert')
    throw insecure(
      `the API on TCP (${where}) is served over HTTPS with the daemon's certificate, and this daemon has none` +
        `${s.credentials?.kind === 'psk' ? ' (--psk-file authenticates migrations without one)' : ''}: give --tls-cert/--tls-key/--tls-ca, or serve the ` +
        'API on a unix socket (--api unix:PATH), or pass --insecure-api for plain HTTP on a loopback address (a local TLS proxy, a test)',
    );
  const { cert, key, ca } = s.credentials;
  return { cert, key, ca, requireClientCert: s.requireClientCert };
}

/** Where the API listens, as a client names it: unix:PATH, https://HOST:PORT or http://HOST:PORT. */
export function describeApi(api: ApiAddress, tls: ApiTls | undefined, port: number): string {
  if ('path' in api) return `unix:${api.path}`;
  const host = api.host.includes(':') ? `[${api.host}]` : api.host;
  return `${tls ? 'https' : 'http'}://${host}:${port}`;
}
