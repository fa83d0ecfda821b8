/**
 * The raw-TCP ceiling every transfer figure is compared with: the same loopback socket setup
 * (Node sockets, TCP_NODELAY, a receiver in another process) moving the same byte count with
 * 1 MiB writes, the receiver discarding what it reads.
 */
import { spawn } from 'node:child_process';
import net from 'node:net';
import { fileURLToPath } from 'node:url';

const SELF = fileURLToPath(import.meta.url);

if (process.argv[1] === SELF) {
  // child: accept one connection, count bytes, answer one byte when `size` bytes arrived
  const size = Number(process.argv[2]);
  const server = net.createServer({ noDelay: true }, (s) => {
    let n = 0;
    s.on('data', (c: Buffer) => {
      n += c.length;
      if (n >= size) s.end(Buffer.of(1));
    });
  });
  server.listen(0, '127.0.0.1', () => process.stdout.write(`${(server.address() as net.AddressInfo).port}\n`));
}

/** Milliseconds to move `size` bytes, from the first write to the receiver's answer. */
export async function rawTcpCeiling(size: number): Promise<number> {
  const sink = spawn(process.execPath, [SELF, String(size)], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve) => sink.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
  const sock = net.connect({ port, host: '127.0.0.1', noDelay: true });
  await new Promise((r) => sock.once('connect', r));
  const ms = await pump(sock, size);
  sock.destroy();
  sink.kill();
  return ms;
}

/** Writes `size` bytes in 1 MiB writes; milliseconds from the first write to the receiver's one-byte answer. */
export async function pump(sock: net.Socket, size: number): Promise<number> {
  const bufs = Array.from({ length: 4 }, () => Buffer.alloc(1 << 20, 0x5a));
  const t0 = performance.now();
  const done = new Promise((r) => sock.once('data', r));
  for (let sent = 0, i = 0; sent < size; sent += 1 << 20, i++) {
    if (!sock.write(bufs[i % 4]!)) await new Promise((r) => sock.once('drain', r));
  }
  await done;
  return performance.now() - t0;
}
