/** livemig resolve: ask a destination what became of a migration whose commitment went unconfirmed. */
import { LivemigError } from '../../errors.js';
import { assertSecureEnough } from '../../security/tls.js';
import { askOutcome } from '../../source/resolve.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { SOURCE_SECURITY_FLAGS, credentialsFrom } from '../security-flags.js';
import { parseHostPort } from '../units.js';

export const resolve: Command = {
  name: 'resolve',
  summary: 'ask a destination whether it activated a migration whose commitment went unconfirmed',
  synopsis: '--to HOST:PORT --session TOKEN [credentials flags]',
  description: [
    'When the link is lost after the commitment was sent and the source could not ask the',
    'destination in time, `send` (or migrate()) fails with ERR_LIVEMIG_ACTIVATION_UNKNOWN, keeps its',
    'guest paused and prints this command with the session token. It asks the destination, over',
    'an authenticated connection like the migration\'s, and prints {"outcome": ...}:',
    '  activated      the guest runs at the destination: release (stop) the paused source copy;',
    '  not-activated  the destination has fenced the session and will never activate it: resume',
    '                 the source copy.',
    'Exits 0 with an answer, 1 without one (the destination is unreachable or does not know the',
    'session: ask again, or check the destination by hand; do not guess).',
  ].join('\n'),
  flags: {
    to: { type: 'string', value: 'HOST:PORT', help: 'the destination (required)' },
    session: { type: 'string', value: 'TOKEN', help: 'the session token from the error (32 hex digits; required)' },
    ...SOURCE_SECURITY_FLAGS,
  },
  async run(v: FlagValues): Promise<number> {
    if (typeof v['to'] !== 'string' || typeof v['session'] !== 'string')
      throw usageError("resolve needs --to HOST:PORT and --session TOKEN (see 'livemig resolve --help')");
    const to = parseHostPort(str(v, 'to'), '--to');
    const session = str(v, 'session');
    if (!/^[0-9a-f]{32}$/.test(session)) throw usageError(`--session must be 32 hex digits, got '${session}'`);
    const credentials = credentialsFrom(v, 'source');
    assertSecureEnough(to.host, credentials, v['insecure'] === true, 'asking');
    try {
      const outcome = await askOutcome({ to, session, ...(credentials ? { credentials } : {}), handshakeTimeoutMs: 10_000 });
      process.stdout.write(JSON.stringify({ outcome, session }) + '\n');
      return 0;
    } catch (e) {
      const err = e as LivemigError;
      process.stdout.write(JSON.stringify({ error: { code: err.code, phase: err.phase, message: err.message }, session }) + '\n');
      return 1;
    }
  },
};
