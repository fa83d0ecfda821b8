/**
 * A 1 Gbit/s link between this host and a network namespace: a veth pair shaped with htb on
 * both ends. Created for a benchmark and removed after it (also on failure).
 */
import { execFileSync } from 'node:child_process';
import type { ReceiverPlace } from '../src/demo/demo.js';

export interface NetLink {
  ns: string;
  near: string;
  far: string;
  remove(): void;
}

const run = (...args: string[]): void => void execFileSync(args[0]!, args.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });

export function createLink(rate = '1gbit'): NetLink {
  const ns = `livemig-bench-${process.pid}`;
  const near = '10.77.0.1';
  const far = '10.77.0.2';
  const a = `lmv${process.pid % 100000}a`;
  const b = `lmv${process.pid % 100000}b`;
  const remove = (): void => {
    try {
      run('ip', 'netns', 'del', ns); // takes the veth pair with it
    } catch {
      // not created (or already gone): nothing to remove
    }
  };
  try {
    run('ip', 'netns', 'add', ns);
    run('ip', 'link', 'add', a, 'type', 'veth', 'peer', 'name', b);
    run('ip', 'link', 'set', b, 'netns', ns);
    run('ip', 'addr', 'add', `${near}/30`, 'dev', a);
    run('ip', 'link', 'set', a, 'up');
    run('ip', '-n', ns, 'addr', 'add', `${far}/30`, 'dev', b);
    run('ip', '-n', ns, 'link', 'set', b, 'up');
    run('ip', '-n', ns, 'link', 'set', 'lo', 'up');
    for (const [pre, dev] of [
      [[], a],
      [['-n', ns], b],
    ] as const) {
      run('tc', ...pre, 'qdisc', 'add', 'dev', dev, 'root', 'handle', '1:', 'htb', 'default', '1');
      run('tc', ...pre, 'class', 'add', 'dev', dev, 'parent', '1:', 'classid', '1:1', 'htb', 'rate', rate, 'ceil', rate);
    }
  } catch (e) {
    remove();
    throw new Error(`cannot create the ${rate} namespace link (needs root, veth and htb): ${(e as Error).message}`, { cause: e });
  }
  process.once('exit', remove);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => (remove(), process.exit(130)));
  return { ns, near, far, remove };
}

/**
 * Where a demo's receiver runs for a link named on a benchmark's command line: `loopback` (this
 * namespace), or across a namespace link of that rate (e.g. `1gbit`), removed by the caller.
 */
export function receiverPlace(linkName: string): { link: NetLink | undefined; at: ReceiverPlace } {
  if (linkName === 'loopback') return { link: undefined, at: { prefix: [], host: '127.0.0.1' } };
  const link = createLink(linkName);
  return { link, at: { prefix: ['ip', 'netns', 'exec', link.ns], host: link.far, observer: link.near } };
}
