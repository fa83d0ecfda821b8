/** livemig send: start a reference guest here and migrate it live to a receiver. */
import { assertSecureEnough } from '../../security/tls.js';
import { LivemigError } from '../../errors.js';
import { migrate } from '../../source/migrate.js';
import { SourceGuest } from '../../workload/controller.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { GUEST_FLAGS, POLICY_FLAGS, downtimeLimit, encodingFlags, guestSpec, maxRounds, policyFlags, printProgress } from '../migration-flags.js';
import { SOURCE_SECURITY_FLAGS, credentialsFrom } from '../security-flags.js';
import { parseHostPort } from '../units.js';

export const send: Command = {
  name: 'send',
  summary: 'start a reference guest here and migrate it to a receiver',
  synopsis: '--to HOST:PORT [flags]',
  description: [
    'Starts a reference guest on this host and migrates it live to `livemig receive` at',
    'HOST:PORT. Prints the migration report as JSON on stdout (progress on stderr). On a',
    'failure it prints {error: {code, phase, message}, source_guest, guest_pid} and exits 1,',
    'leaving the guest to run on: source_guest is running (resumed here: any failure before',
    'the commitment), paused (the outcome could not be confirmed: see `livemig resolve`) or',
    'released (it runs at the destination).',
  ].join('\n'),
  flags: {
    to: { type: 'string', value: 'HOST:PORT', help: 'the receiver (required)' },
    heartbeat: { type: 'string', value: 'HOST:PORT', help: "where the guest sends its UDP heartbeats (default none)" },
    ...GUEST_FLAGS,
    ...POLICY_FLAGS,
    ...SOURCE_SECURITY_FLAGS,
  },
  async run(v: FlagValues): Promise<number> {
    if (typeof v['to'] !== 'string') throw usageError("send needs --to HOST:PORT (see 'livemig send --help')");
    const to = parseHostPort(str(v, 'to'), '--to');
    const g = guestSpec(v);
    const credentials = credentialsFrom(v, 'source');
    const settings = { downtimeLimitMs: downtimeLimit(v), maxRounds: maxRounds(v), encodings: encodingFlags(v), ...policyFlags(v), ...(credentials ? { credentials } : {}), ...(v['insecure'] === true ? { insecure: true } : {}) };
    // refused before a guest starts
    assertSecureEnough(to.host, credentials, v['insecure'] === true, 'migrating to');
    const guest = await SourceGuest.spawn({ ...g, ...(typeof v['heartbeat'] === 'string' ? { heartbeat: v['heartbeat'] } : {}) });
    // what became of the guest, for the failure report
    let state = 'running' as 'running' | 'paused' | 'released';
    try {
      const report = await migrate({
        region: guest.region,
        ...(guest.target ? { target: guest.target } : {}),
        to,
        pause: async (lease) => {
          state = 'paused'; // (a pause that fails half-way is resumed by the rollback)
          return guest.pause(lease);
        },
        commit: () => guest.commit(),
        resume: async () => {
          await guest.resume();
          state = 'running';
        },
        release: async () => {
          await guest.exit();
          state = 'released';
        },
        throttle: (p) => guest.throttle(p),
        ...settings,
        ...(v['json'] === true ? {} : { onProgress: printProgress }),
      });
      process.stdout.write(JSON.stringify(report) + '\n');
      return 0;
    } catch (e) {
      const err = e instanceof LivemigError ? e : new LivemigError('ERR_LIVEMIG_ABORTED', (e as Error).message, { phase: 'migrate', cause: e });
      const pid = guest.child.pid ?? 0;
      if (state !== 'released') guest.detach(); // it runs on (or waits, paused) without us
      process.stdout.write(JSON.stringify({ error: { code: err.code, phase: err.phase, message: err.message }, source_guest: state, guest_pid: pid }) + '\n');
      process.stderr.write(`livemig: ${err.code} (${err.phase ?? 'migrate'}): ${err.message}; the source guest is ${state} (pid ${pid})\n`);
      return 1;
    }
  },
};
