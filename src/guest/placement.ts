/**
 * Where a guest the daemon starts lives, so that it outlives the daemon: a session of its own
 * (no signal to the daemon's process group reaches it, no terminal hangs up on it), and, when
 * the daemon runs as a systemd service, a transient scope of its own, out of the service's
 * cgroup (KillMode=control-group would otherwise stop every guest with every restart or
 * upgrade of livemig). QEMU guests under libvirt live the same way: machine scopes, not the
 * daemon's.
 */
import { accessSync, constants, existsSync } from 'node:fs';
import path from 'node:path';

export type GuestPlacement = 'own-session' | 'systemd-scope';

/** systemd-run, when this process is a systemd service's on a host booted with systemd; else undefined */
function systemdRun(): string | undefined {
  // sd_booted(3)'s test; INVOCATION_ID is set for every unit systemd starts
  if (!existsSync('/run/systemd/system') || process.env['INVOCATION_ID'] === undefined) return undefined;
  for (const dir of (process.env['PATH'] ?? '/usr/bin:/bin').split(':')) {
    const p = path.join(dir, 'systemd-run');
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // not in this directory: the next one
    }
  }
  return undefined;
}

/**
 * `argv` as the daemon starts it for guest `unit` (a name systemd accepts: [A-Za-z0-9._-]):
 * in a scope of its own where systemd runs the daemon (systemd-run execs the guest, which keeps
 * its pid), in a session of its own in every case (the caller spawns it detached).
 */
export function placeGuest(argv: readonly string[], unit: string): { argv: string[]; placement: GuestPlacement } {
  const run = systemdRun();
  if (!run) return { argv: [...argv], placement: 'own-session' };
  return { argv: [run, '--scope', '--quiet', '--collect', `--unit=livemig-guest-${unit}`, '--', ...argv], placement: 'systemd-scope' };
}
