/** livemig serve: the daemon, driven over HTTP (src/daemon/). */
import path from 'node:path';
import { readFileSync } from 'node:fs';
import { Daemon, defaultParallel, type ApiAddress } from '../../daemon/daemon.js';
import { MIGRATION_HISTORY } from '../../daemon/events.js';
import { HISTORY_FILE } from '../../daemon/history-store.js';
import { FINISHED_KEPT, REFUSED_KEPT } from '../../daemon/migration.js';
import { LivemigError } from '../../errors.js';
import { referenceIncomingCommand } from '../../workload/controller.js';
import { diskDir, keepDisks } from '../migration-flags.js';
import { API_ENV, DEFAULT_API, TOKEN_FILE_ENV, defaultDaemonDir, flagOrEnv, parseApiAddress, readToken } from '../daemon-client.js';
import { str, usageError, type Command, type FlagValues } from '../flags.js';
import { DESTINATION_SECURITY_FLAGS, credentialsFrom } from '../security-flags.js';
import { parseHostPort, parseNumber, parseSize } from '../units.js';
import { printRefusal, shellCommand } from './receive.js';
import { qemuCommand } from '../qemu-exec.js';
import { addon, call } from '../../native.js';
import { whenStdoutCloses } from '../output.js';

function version(): string {
  try {
    return (JSON.parse(readFileSync(new URL('../../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
  } catch {
    return '0';
  }
}

/** A history bound: a whole number from 1 to 100000 (all that is kept is loaded at start). */
function historyBound(text: string, flag: string): number {
  const n = Number(text);
  if (!/^[0-9]+$/.test(text) || n < 1 || n > 100_000) throw usageError(`${flag} must be an integer in 1..100000, got '${text}'`);
  return n;
}

function niceValue(text: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n < -20 || n > 19) throw usageError(`--nice must be an integer in -20..19, got '${text}'`);
  return n;
}

/**
 * Where the API listens, and whether in plain HTTP. TCP is HTTPS (HOST:PORT, https://); plain
 * HTTP (http://, or HOST:PORT with --insecure-api) only with --insecure-api, which the daemon
 * refuses off loopback.
 */
function apiAddress(text: string, from: string, insecureApi: boolean): { api: ApiAddress; insecureApi: boolean } {
  const a = parseApiAddress(text, from);
  if ('path' in a) {
    if (insecureApi) throw usageError(`--insecure-api is for an API on TCP: ${text} is a unix socket, plain HTTP already (mode 0600)`);
    return { api: { path: a.path }, insecureApi: false };
  }
  const plainAsked = /^http:\/\//i.test(text);
  if (plainAsked && !insecureApi)
    throw new LivemigError(
      'ERR_LIVEMIG_INSECURE',
      `${from}: ${text} is plain HTTP on TCP: the API is served over HTTPS (HOST:PORT or https://HOST:PORT, with --tls-cert/--tls-key/--tls-ca); ` +
        'plain HTTP needs --insecure-api, on a loopback address only',
      { phase: 'validate' },
    );
  if (insecureApi && /^https:\/\//i.test(text)) throw usageError(`${from}: ${text} asks for HTTPS and --insecure-api for plain HTTP: give one`);
  return { api: { host: a.host, port: a.port }, insecureApi };
}

export const serve: Command = {
  name: 'serve',
  summary: 'run the daemon: guests register, migrations go both ways, an HTTP API drives it',
  synopsis: '[--api unix:PATH|HOST:PORT|https://HOST:PORT] [--token-file FILE] [--listen HOST:PORT] [--guests PATH] [flags]',
  description: [
    'Runs the livemig daemon of this host. Running guests register at --guests PATH',
    '(`livemig guest --register PATH`, or lmg_source_register in a VMM) and are listed by name;',
    'an orchestrator (or `livemig guests/migrate/status/watch/cancel/postcopy/set`) drives it',
    'over the HTTP API (docs/API.md; the OpenAPI document at /v1/openapi.json): it migrates',
    'guests to other daemons and takes migrations from them on --listen, several at once both',
    'ways. On TCP the API is HTTPS with the daemon certificate (--tls-cert/--tls-key, the one',
    'its migration port presents; --api-mtls: clients need a certificate --tls-ca signed) and',
    'needs --token-file (a bearer token on every route but /v1/health); plain HTTP on TCP is',
    'refused but with --insecure-api on a loopback address. The unix socket is plain HTTP, mode',
    '0600. --api and --token-file default to $LIVEMIG_API and',
    "$LIVEMIG_TOKEN_FILE, as the clients' do. Its migrations, their reports and events are kept",
    'in --state-dir/history.db (SQLite), written as they happen: a daemon started again on the',
    'same directory lists those of its earlier runs (one it stopped during as failed,',
    'ERR_LIVEMIG_DAEMON_STOPPED). Prints {serving: {...}} once up, and a {refused:',
    '{from, reason, code, phase, message}} line for each source refused on --listen (kept as an',
    'incoming migration in state refused). SIGTERM (or SIGINT), or its stdout closed: no new',
    'migrations; the running ones finish within --shutdown-grace, or are cancelled before their',
    'commitment (their guests resume here); then it exits 0. QEMU VMs: one registers by its QMP',
    'socket (`livemig guests --register NAME --qemu PATH`, POST /v1/guests); with --qemu-exec',
    'the guests coming in are QEMU VMs started from that command line (docs/QEMU.md).',
  ].join('\n'),
  flags: {
    api: {
      type: 'string',
      value: 'unix:PATH|/PATH|HOST:PORT|https://HOST:PORT|http://HOST:PORT',
      help:
        `where the API listens: a unix socket (plain HTTP), or TCP in HTTPS (HOST:PORT, https://; http:// only with --insecure-api) ` +
        `(default $${API_ENV}, else ${DEFAULT_API()})`,
    },
    'insecure-api': {
      type: 'boolean',
      default: false,
      help: 'serve the API on TCP in plain HTTP, on purpose (a local TLS proxy, a test): refused off a loopback address',
    },
    'api-mtls': {
      type: 'boolean',
      default: false,
      help: 'the API on TCP requires a client certificate signed by --tls-ca (mutual TLS), besides the token',
    },
    'token-file': {
      type: 'string',
      value: 'FILE',
      help:
        "the API's bearer token, one line of 16 or more characters in a file only its owner can read (`livemig keys token` writes one; " +
        `required with a TCP --api; default $${TOKEN_FILE_ENV})`,
    },
    listen: { type: 'string', default: '127.0.0.1:7878', value: 'HOST:PORT', help: 'the migration port other daemons send to (port 0: any free port)' },
    guests: { type: 'string', value: 'PATH', help: `the socket guests register at (default ${path.join(defaultDaemonDir(), 'guests.sock')})` },
    'guest-exec': {
      type: 'string',
      value: "'COMMAND ... {socket}'",
      help:
        'the destination guest to start for each incoming migration (run by /bin/sh; default: the reference guest); ' +
        '{register} and {name}: the guest socket and the name it registers under once it runs, to be migrated again',
    },
    'qemu-exec': {
      type: 'string',
      value: "'qemu-system-x86_64 ... {memory}'",
      help:
        "the guests coming in are QEMU VMs (a daemon's registered QEMU VM, or send --qemu): QEMU's command line, run by /bin/sh, the source " +
        "VM's own with its memory backend's mem-path={memory}; livemig adds -qmp, -incoming defer and -S (docs/QEMU.md). An operator's " +
        'setting: no API caller chooses what this daemon runs. Pre-copy only; not with --guest-exec or --disk-dir',
    },
    'memory-budget': { type: 'string', value: 'SIZE', help: 'bytes incoming migrations may reserve together (default: what MemAvailable allows, at each one)' },
    bandwidth: { type: 'string', value: 'MiB/s', help: 'total bandwidth of outgoing migrations, shared fairly (default none)' },
    'max-migrations': { type: 'string', default: '16', value: 'N', help: 'incoming migrations at once (more are refused as busy); also bounds --parallel' },
    parallel: {
      type: 'string',
      value: 'N',
      help: `outgoing migrations that transfer at once; the others wait queued (default one per two CPUs: ${defaultParallel()} here)`,
    },
    nice: {
      type: 'string',
      value: 'N',
      help:
        "the daemon's own nice value (default -5 as root, else 0): guests' pauses wait on it; the destination guests it starts keep the nice it " +
        'was started with',
    },
    'shutdown-grace': {
      type: 'string',
      default: '30',
      value: 'SECONDS',
      help: 'at SIGTERM, how long running migrations have to finish before the uncommitted ones are cancelled',
    },
    'handshake-timeout': {
      type: 'string',
      default: '10',
      value: 'SECONDS',
      help: 'an incoming connection must authenticate and send its first frame within this',
    },
    'progress-timeout': { type: 'string', default: '30', value: 'SECONDS', help: 'an incoming migration silent this long is discarded here' },
    'state-dir': {
      type: 'string',
      value: 'DIR',
      help:
        'where the migration history is kept (DIR/history.db, locked while the daemon runs: one daemon per directory; default the directory of ' +
        `--guests, ${defaultDaemonDir()} unless given, which a reboot empties: give e.g. /var/lib/livemig to keep the history across one)`,
    },
    'disk-dir': {
      type: 'string',
      value: 'DIR',
      help:
        "take guests' disks: each guest's images are created in DIR/GUEST/ as NAME.img, sparse, never over an existing file, removed if its " +
        'migration fails before activation (default: migrations with disks are refused)',
    },
    'keep-disks': {
      type: 'string',
      value: 'SECONDS',
      help:
        "with --disk-dir: a migration that fails before its guest runs here keeps its images that long, and the guest's next migration here " +
        'sends only the blocks that differ (default 0: removed at once)',
    },
    prealloc: {
      type: 'boolean',
      default: false,
      help:
        "touch the memory of a guest coming in before its first page, as QEMU's destination prealloc: the first pass then runs at memory " +
        'speed where this host is slow to hand over memory, and the preparation takes that time instead; where disk post-copy may follow, the ' +
        "images' page cache too, so that a guest's read of a missing block waits less (default: memory is touched as pages arrive)",
    },
    'keep-images': {
      type: 'string',
      value: 'SIZE',
      help:
        'memory of guests this daemon sent away kept for their return, up to SIZE in all (e.g. 8GiB; the oldest goes first): ' +
        'one coming back then moves only the pages that changed while it was gone (default: none kept)',
    },
    'history-migrations': {
      type: 'string',
      default: String(FINISHED_KEPT),
      value: 'N',
      help: `ended migrations the history keeps, the newest (refused sources apart: the newest ${REFUSED_KEPT}); all are loaded at start`,
    },
    'history-events': {
      type: 'string',
      default: String(MIGRATION_HISTORY),
      value: 'N',
      help: 'events the history keeps of each migration, the newest (state, stage, round, report: progress is not kept)',
    },
    ...DESTINATION_SECURITY_FLAGS,
    'tls-cert': {
      ...DESTINATION_SECURITY_FLAGS['tls-cert']!,
      help: "this host's certificate (PEM): migrations authenticate with it (TLS 1.3), and the API on TCP serves HTTPS with it",
    },
  },
  async run(v: FlagValues): Promise<number> {
    const apiFlag = flagOrEnv(v, 'api', API_ENV) ?? { value: DEFAULT_API(), from: '--api' };
    const { api, insecureApi } = apiAddress(apiFlag.value, apiFlag.from, v['insecure-api'] === true);
    const tokenFile = flagOrEnv(v, 'token-file', TOKEN_FILE_ENV);
    const listen = parseHostPort(str(v, 'listen'), '--listen');
    const credentials = credentialsFrom(v, 'destination');
    const qemuLine = typeof v['qemu-exec'] === 'string' ? qemuCommand(v['qemu-exec']) : undefined;
    if (qemuLine && (typeof v['guest-exec'] === 'string' || typeof v['disk-dir'] === 'string'))
      throw usageError('--qemu-exec starts a QEMU VM for each guest coming in: not with --guest-exec, nor (yet) with --disk-dir');
    const max = parseNumber(str(v, 'max-migrations'), '--max-migrations', 1);
    const guests = typeof v['guests'] === 'string' ? v['guests'] : path.join(defaultDaemonDir(), 'guests.sock');
    const stateDir = typeof v['state-dir'] === 'string' ? v['state-dir'] : path.dirname(path.resolve(guests));
    const history = {
      file: path.join(path.resolve(stateDir), HISTORY_FILE),
      keepMigrations: historyBound(str(v, 'history-migrations'), '--history-migrations'),
      keepEvents: historyBound(str(v, 'history-events'), '--history-events'),
      onFailure: (e: LivemigError) => process.stderr.write(`livemig: ${e.code} (${e.phase ?? 'history'}): ${e.message}\n`),
    };
    // The stop signals are taken before anything starts: one that came before the handlers
    // (a supervisor that signals as soon as it reads {serving}) ended the process by the
    // default action. A second signal must not cut the shutdown short either: a service manager
    // signals every process of the unit, and the parent that sized the pool passes its own on.
    let signalled: (sig: NodeJS.Signals) => void = () => undefined;
    const stopSignal = new Promise<NodeJS.Signals>((resolve) => (signalled = resolve));
    let stopping = false;
    const stop = (sig: NodeJS.Signals): void => {
      if (stopping) return;
      stopping = true;
      // from here on the kernel ignores them
      call('ERR_LIVEMIG_SYSCALL', 'serve', 'ignoring further stop signals', () => addon.ignoreStopSignals());
      signalled(sig);
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
    // whoever read its lines has gone: it shuts down in order, as for SIGTERM (not by SIGPIPE).
    // Not where systemd connected stdout to the journal (JOURNAL_STREAM): a journald restart
    // closes that stream, which must cost the host some lines, not its daemon
    whenStdoutCloses(process.env['JOURNAL_STREAM'] ? () => undefined : () => stop('SIGPIPE'));
    const daemon = await Daemon.start({
      api,
      ...(tokenFile ? { token: readToken(tokenFile.value, tokenFile.from) } : {}),
      listen,
      guests,
      history,
      ...(credentials ? { credentials } : {}),
      ...(v['insecure'] === true ? { insecure: true } : {}),
      ...(insecureApi ? { insecureApi } : {}),
      ...(v['api-mtls'] === true ? { apiClientCerts: true } : {}),
      ...(typeof v['memory-budget'] === 'string' ? { memoryBudget: parseSize(v['memory-budget'], '--memory-budget') } : {}),
      ...(v['prealloc'] === true ? { prealloc: true } : {}),
      ...(typeof v['disk-dir'] === 'string' ? { diskDir: diskDir(v['disk-dir']), keepDisksMs: keepDisks(v).keepMs ?? 0 } : {}),
      ...(typeof v['keep-images'] === 'string' ? { keepImagesBytes: parseSize(v['keep-images'], '--keep-images') } : {}),
      ...(typeof v['bandwidth'] === 'string' ? { bandwidthMiBps: parseNumber(v['bandwidth'], '--bandwidth (MiB/s)', Number.MIN_VALUE) } : {}),
      maxMigrations: Math.floor(max),
      ...(typeof v['parallel'] === 'string' ? { parallel: Math.floor(parseNumber(v['parallel'], '--parallel', 1)) } : {}),
      ...(qemuLine ? { qemuCommand: qemuLine } : {}),
      guestCommand: typeof v['guest-exec'] === 'string' ? shellCommand(v['guest-exec']) : referenceIncomingCommand({ register: true }),
      nice: typeof v['nice'] === 'string' ? niceValue(v['nice']) : process.getuid?.() === 0 ? -5 : 0,
      shutdownGraceMs: parseNumber(str(v, 'shutdown-grace'), '--shutdown-grace (seconds)') * 1000,
      authTimeoutMs: parseNumber(str(v, 'handshake-timeout'), '--handshake-timeout (seconds)', Number.MIN_VALUE) * 1000,
      idleTimeoutMs: parseNumber(str(v, 'progress-timeout'), '--progress-timeout (seconds)', Number.MIN_VALUE) * 1000,
      version: version(),
      onRefused: printRefusal,
    });
    process.stdout.write(
      JSON.stringify({
        serving: {
          api: daemon.apiAddress,
          listen: `${listen.host}:${daemon.migrationPort}`,
          port: daemon.migrationPort,
          guests: daemon.registry.path,
          history: { file: history.file, ...daemon.history!.restored },
          pid: process.pid,
        },
      }) + '\n',
    );
    const sig = await stopSignal;
    process.stdout.write(JSON.stringify({ stopping: { signal: sig, running: daemon.table.active().length } }) + '\n');
    await daemon.shutdown();
    const line = JSON.stringify({ stopped: { migrations: daemon.table.list().length } }) + '\n';
    await new Promise<void>((resolve) => process.stdout.write(line, () => resolve()));
    // Node's teardown would set the stop signals back to their default action: a second one
    // landing then (the parent's, or a service manager's sent to every process) would end the
    // daemon by it. Nothing is left to tear down: the shutdown closed everything.
    return addon.exitNow(0);
  },
};
