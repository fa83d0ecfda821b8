/**
 * Command-line flags: each command declares its flags once, with their help, and gets its
 * parsing, its help text and its usage errors from here. A usage error is
 * ERR_LIVEMIG_INVALID_ARGUMENT in stage 'usage', and the command exits 2 for it.
 */
import { parseArgs } from 'node:util';
import { LivemigError } from '../errors.js';

export interface FlagSpec {
  type: 'string' | 'boolean';
  default?: string | boolean;
  /** the value's name in the help (e.g. HOST:PORT) */
  value?: string;
  help: string;
}

export type Flags = Record<string, FlagSpec>;
export type FlagValues = Record<string, string | boolean | undefined>;

export interface Command {
  name: string;
  /** one line for the global usage */
  summary: string;
  /** e.g. "--to HOST:PORT [flags]" */
  synopsis: string;
  /** what the command does, a few lines */
  description: string;
  flags: Flags;
  /** the command takes words before its flags (e.g. `keys psk`) */
  positionals?: boolean;
  run(values: FlagValues, positionals: string[]): Promise<number>;
}

export const USAGE_EXIT = 2;

export function usageError(message: string): LivemigError {
  return new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', message, { phase: 'usage' });
}

export function isUsageError(e: unknown): boolean {
  if (!(e instanceof LivemigError)) return false;
  return e.code === 'ERR_LIVEMIG_INSECURE' || (e.code === 'ERR_LIVEMIG_INVALID_ARGUMENT' && (e.phase === 'usage' || e.phase === 'validate'));
}

const HELP_FLAG: FlagSpec = { type: 'boolean', help: 'print this help and exit' };

/** Parses argv against the command's flags; unknown flags and stray arguments are usage errors. */
export function parseFlags(cmd: Command, argv: string[]): { values: FlagValues; positionals: string[] } | 'help' {
  const options: Record<string, { type: 'string' | 'boolean'; default?: string | boolean; short?: string }> = {};
  for (const [name, f] of Object.entries({ ...cmd.flags, help: HELP_FLAG })) {
    options[name] = { type: f.type, ...(f.default !== undefined ? { default: f.default } : {}), ...(name === 'help' ? { short: 'h' } : {}) };
  }
  let parsed: ReturnType<typeof parseArgs>;
  try {
    parsed = parseArgs({ args: argv, options, strict: true, allowPositionals: cmd.positionals === true });
  } catch (e) {
    throw usageError(`${cmd.name}: ${(e as Error).message.split('\n')[0]}`);
  }
  if (parsed.values['help']) return 'help';
  return { values: parsed.values as FlagValues, positionals: parsed.positionals };
}

/** What follows a usage error: the command's usage line, and where its flags are (unless the error said so). */
export function commandUsage(cmd: Command, error: string): string {
  const pointer = error.includes(`livemig ${cmd.name} --help`) ? '' : `(every flag: livemig ${cmd.name} --help)\n`;
  return `usage: livemig ${cmd.name} ${cmd.synopsis}\n${pointer}`;
}

export function commandHelp(cmd: Command): string {
  const rows = Object.entries({ ...cmd.flags, help: HELP_FLAG }).map(([name, f]) => {
    const left = `--${name}${f.type === 'string' ? ` ${f.value ?? 'VALUE'}` : ''}`;
    const def = f.default !== undefined && f.type === 'string' ? ` (default ${String(f.default)})` : '';
    return [left, f.help + def] as const;
  });
  const width = Math.min(30, Math.max(...rows.map(([l]) => l.length)) + 2);
  const lines = rows.map(([l, r]) => (l.length + 2 > width ? `  ${l}\n  ${' '.repeat(width)}${r}` : `  ${l.padEnd(width)}${r}`));
  return `usage: livemig ${cmd.name} ${cmd.synopsis}\n\n${cmd.description}\n\nflags:\n${lines.join('\n')}\n`;
}

/** The value of a string flag that has a default. */
export function str(v: FlagValues, name: string): string {
  const x = v[name];
  if (typeof x !== 'string') throw usageError(`--${name} needs a value`);
  return x;
}
