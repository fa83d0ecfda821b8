/**
 * A reader that stops reading (`livemig status | head -1`) closes the pipe, and the next write
 * fails with EPIPE. A C program dies of SIGPIPE there, quietly; livemig ends as quietly, with the
 * exit status it has reached (0 when it has none yet), instead of an unhandled 'error' event's
 * stack trace. A command that must wind down in order (serve) says how with whenStdoutCloses.
 */
let onClosed: (() => void) | undefined;

/** What to do instead of exiting when stdout closes. */
export function whenStdoutCloses(f: () => void): void {
  onClosed = f;
}

let guarded = false;

export function guardOutput(): void {
  if (guarded) return;
  guarded = true;
  let closed = false;
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    // a line written after the close (by a command that goes on) fails again: it is lost, as the first
    if (closed && (e.code === 'EPIPE' || e.code === 'ERR_STREAM_DESTROYED')) return;
    if (e.code !== 'EPIPE') throw e;
    closed = true;
    if (onClosed) onClosed();
    else process.exit(process.exitCode ?? 0);
  });
  process.stderr.on('error', (e: NodeJS.ErrnoException) => {
    // nothing is left to tell a failure to; the command goes on, and its exit status says how it ended
    if (e.code !== 'EPIPE') throw e;
  });
}
