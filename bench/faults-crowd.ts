/**
 * bench/faults' crowd from the sender's own address (issue 29, point 2), as a process of its
 * own: an attacker on the source's host is one, and 64 loops churning connections inside the
 * bench would share the source's event loop (runDemo migrates from the bench's process) and
 * slow the source rather than the receiver. Each loop connects from 127.0.0.1 to the
 * receiver, sends 0x16 (the first byte of a TLS handshake record, so that the receiver has
 * something to wait on), waits for the receiver to let it go, and connects again.
 *   forked by bench/faults with PORT LOOPS; sends {ready} once the loops are in place, and
 *   {stats} after 'stop', then exits. Not a command to run by hand.
 */
import net from 'node:net';

const port = Number(process.argv[2]);
const loops = Number(process.argv[3]);
const TLS_HANDSHAKE = Buffer.from([0x16]);
/** a refused connect (the receiver gone at the end of a run) would otherwise spin */
const RETRY_REFUSED_MS = 100;

const sockets = new Set<net.Socket>();
const timers = new Set<NodeJS.Timeout>();
let stopped = false;
const stats = { loops, opened: 0, closed_by_receiver: 0, not_connected: 0, open_at_stop: 0 };

function open(): void {
  if (stopped) return;
  const s = net.connect({ port, host: '127.0.0.1', localAddress: '127.0.0.1' });
  stats.opened++;
  sockets.add(s);
  let connected = false;
  s.on('error', () => undefined);
  s.resume();
  s.once('connect', () => {
    connected = true;
    s.write(TLS_HANDSHAKE);
  });
  s.on('close', () => {
    sockets.delete(s);
    if (stopped) return;
    if (connected) {
      stats.closed_by_receiver++;
      return open();
    }
    stats.not_connected++;
    const t = setTimeout(() => (timers.delete(t), open()), RETRY_REFUSED_MS);
    timers.add(t);
  });
}

for (let i = 0; i < loops; i++) open();
// the same half second bench/faults gives its idle crowd to be in place before the guest starts
setTimeout(() => process.send?.({ ready: true }), 500);
process.on('message', (m) => {
  if (m !== 'stop') return;
  stopped = true;
  stats.open_at_stop = sockets.size;
  for (const t of timers) clearTimeout(t);
  for (const s of sockets) s.destroy();
  process.send?.({ stats }, () => process.exit(0));
});
// the bench went away (^C, a crash): its crowd goes with it
process.on('disconnect', () => process.exit(0));
