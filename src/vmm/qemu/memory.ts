/**
 * A QEMU VM's RAM as livemig sees it: the memory backends QEMU reports (query-memdev, qom-get),
 * each a shared, named file livemig opens too. QEMU leaves a RAM block out of its own migration
 * stream (x-ignore-shared) only when it is `share=on` and backed by a named file
 * (memory-backend-file); any other backend would travel in QEMU's stream, or (at the
 * destination) load silently as zeros: such a VM is refused, naming the -object to use.
 */
import { closeSync, fstatSync, openSync, readFileSync } from 'node:fs';
import { LivemigError } from '../../errors.js';
import type { QmpClient } from './qmp.js';

export interface QemuMemdev {
  id: string;
  size: number;
  share: boolean;
}

export interface QemuRam {
  id: string;
  size: number;
  /** the backend's file, as QEMU names it */
  path: string;
  /** livemig's own descriptor of it, read-write */
  fd: number;
  /** where QEMU maps it (its process's address), for exact write tracking */
  address: bigint;
}

export const SHARED_FILE_HINT =
  '-object memory-backend-file,id=ram0,size=SIZE,mem-path=/dev/shm/NAME,share=on -machine memory-backend=ram0 (QEMU skips only shared, named files)';

function refused(why: string): LivemigError {
  return new LivemigError('ERR_LIVEMIG_QEMU', why, { phase: 'qemu' });
}

/** The VM's memory backends, each checked: a shared named file, QEMU's mapping of it found. */
export async function qemuRam(qmp: QmpClient): Promise<QemuRam[]> {
  const memdevs = await qmp.execute<QemuMemdev[]>('query-memdev');
  if (!Array.isArray(memdevs) || memdevs.length === 0)
    throw refused(`the VM's RAM is not on a memory backend QEMU reports (query-memdev is empty): start it with ${SHARED_FILE_HINT}`);
  // several backends (NUMA nodes) land in one page space at offsets QEMU 7.2 cannot take at the destination
  if (memdevs.length > 1)
    throw refused(`the VM has ${memdevs.length} memory backends (${memdevs.map((m) => m.id).join(', ')}): livemig moves VMs with one so far`);
  const found: QemuRam[] = [];
  try {
    for (const m of memdevs) {
      if (typeof m.id !== 'string' || !Number.isSafeInteger(m.size) || m.size <= 0 || m.size % 4096 !== 0)
        throw refused(`query-memdev reported a backend livemig cannot use: ${JSON.stringify(m).slice(0, 200)}`);
      if (m.share !== true)
        throw refused(`memory backend ${m.id} is not shared (share=off): QEMU would send its RAM itself; start it with ${SHARED_FILE_HINT}`);
      let path: unknown;
      try {
        path = await qmp.execute('qom-get', { path: `/objects/${m.id}`, property: 'mem-path' });
      } catch (e) {
        throw refused(`memory backend ${m.id} is not a file (${(e as Error).message}): QEMU would send its RAM itself; start it with ${SHARED_FILE_HINT}`);
      }
      if (typeof path !== 'string' || !path.startsWith('/')) throw refused(`memory backend ${m.id}: mem-path ${JSON.stringify(path)} is not an absolute path`);
      found.push(openRam(qmp.pid, m, path));
    }
    return found;
  } catch (e) {
    for (const r of found) closeSync(r.fd);
    throw e;
  }
}

/** Opens the backend's file (through QEMU's own view of its filesystem) and finds QEMU's mapping of it. */
function openRam(pid: number, m: QemuMemdev, path: string): QemuRam {
  // QEMU may see another mount namespace: its root is the one to open the path in; a path into
  // its own descriptors (a VM livemig brought here: /proc/self/fd/N) is QEMU's, not ours
  const own = /^\/proc\/self\/(fd\/\d+)$/.exec(path);
  const fd = openSync(own ? `/proc/${pid}/${own[1]}` : `/proc/${pid}/root${path}`, 'r+');
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw refused(`memory backend ${m.id}: ${path} is not a regular file (a hugetlbfs or tmpfs file is)`);
    if (st.size < m.size) throw refused(`memory backend ${m.id}: ${path} holds ${st.size} bytes, fewer than its ${m.size}`);
    const address = mappingOf(pid, st.dev, st.ino, m.size);
    if (address === undefined) throw refused(`memory backend ${m.id}: QEMU (pid ${pid}) maps no ${m.size} bytes of ${path}: is it this VM's RAM?`);
    return { id: m.id, size: m.size, path, fd, address };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** Where process `pid` maps `size` bytes of the file (dev, ino) from offset 0, or undefined. */
export function mappingOf(pid: number, dev: number, ino: number, size: number): bigint | undefined {
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8');
  const devHex = (n: number): string => n.toString(16).padStart(2, '0');
  // the kernel writes dev as MAJOR:MINOR in hex (new_encode_dev's halves)
  const want = `${devHex(Math.floor(dev / 256) & 0xfff)}:${devHex((dev & 0xff) | ((dev >>> 12) & 0xfff00))}`;
  for (const line of maps.split('\n')) {
    const f = line.split(/\s+/);
    if (f.length < 6 || f[4] !== String(ino) || f[2] !== '00000000' || f[3] !== want || !f[1]!.includes('s')) continue;
    const [lo, hi] = f[0]!.split('-').map((h) => BigInt(`0x${h}`)) as [bigint, bigint];
    if (hi - lo >= BigInt(size)) return lo;
  }
  return undefined;
}
