/**
 * A receiver for bench/disk across a namespace link: takes one migration's memory and disks
 * into DIR with no guest behind it (the bench moves an image, not a running guest), prints
 * {port} once listening and {received} (or {error}) at the end.
 *   node dist/bench/disk-receiver.js HOST DIR
 */
import { listen } from '../src/receiver/listen.js';

const [host, dir] = process.argv.slice(2);
const rx = await listen(host!, 0, { disks: { dir: dir! }, insecure: true, activate: async () => undefined });
process.stdout.write(JSON.stringify({ port: rx.port }) + '\n');
try {
  process.stdout.write(JSON.stringify({ received: await rx.next() }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ error: (e as Error).message }) + '\n');
}
await rx.close();
