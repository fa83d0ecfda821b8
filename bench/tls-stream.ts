/**
 * The Node TLS stream baseline of bench/secure: the same byte count as the raw-TCP ceiling
 * (bench/raw-tcp.ts) through Node's own TLS socket (TLS 1.3, AES-256-GCM, a certificate from a
 * test CA), a receiver in another process discarding what it reads. This is what moving pages
 * through a user-space TLS socket in Node would cost.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { pump } from './raw-tcp.js';

const SELF = fileURLToPath(import.meta.url);

if (process.argv[1] === SELF) {
  // child: argv size, certificate directory; accept one connection, answer one byte at `size`
  const size = Number(process.argv[2]);
  const dir = process.argv[3]!;
  const server = tls.createServer(
    { cert: readFileSync(path.join(dir, 'dst.crt')), key: readFileSync(path.join(dir, 'dst.key')), minVersion: 'TLSv1.3', ciphers: 'TLS_AES_256_GCM_SHA384' },
    (s) => {
      s.setNoDelay(true);
      let n = 0;
      s.on('data', (c: Buffer) => {
        n += c.length;
        if (n >= size) s.end(Buffer.of(1));
      });
    },
  );
  server.listen(0, '127.0.0.1', () => process.stdout.write(`${(server.address() as { port: number }).port}\n`));
}

/** Milliseconds to move `size` bytes through Node's TLS, from the first write to the receiver's answer. */
export async function nodeTlsStream(size: number, certDir: string): Promise<{ ms: number; cipher: string }> {
  const sink = spawn(process.execPath, [SELF, String(size), certDir], { stdio: ['ignore', 'pipe', 'inherit'] });
  const port = await new Promise<number>((resolve) => sink.stdout!.once('data', (d: Buffer) => resolve(Number(d.toString().trim()))));
  const sock = tls.connect({ port, host: '127.0.0.1', ca: readFileSync(path.join(certDir, 'ca.crt')), servername: 'dst', minVersion: 'TLSv1.3' });
  await new Promise((r) => sock.once('secureConnect', r));
  sock.setNoDelay(true);
  const ms = await pump(sock, size);
  const cipher = sock.getCipher().name;
  sock.destroy();
  sink.kill();
  return { ms, cipher };
}
