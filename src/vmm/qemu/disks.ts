/**
 * A QEMU VM's disks as livemig moves them: raw images on local storage (a raw format node over
 * a `file` or `host_device` protocol node, or such a protocol node alone), found with
 * `query-block` and `query-named-block-nodes`, each opened through QEMU's own view of its
 * filesystem and checked to be a file QEMU holds open. Anything else (qcow2 and other formats,
 * backing chains, network storage, a raw node over a slice of its file) refuses the whole VM
 * before anything moves: moving only some disks would start a VM without the others.
 *
 * At the destination, the operator's command line names where each disk goes with
 * `{disk:NAME}`; livemig creates the image and puts its path there, then checks that the QEMU
 * it started has exactly those disks, each on its image.
 */
import { closeSync, fstatSync, openSync, readdirSync, statSync } from 'node:fs';
import { LivemigError } from '../../errors.js';
import { GUEST_NAME } from '../../guest/layout.js';
import { DISK_BLOCK, MAX_DISKS, type SourceDisk } from '../../disk/spec.js';
import type { QmpClient } from './qmp.js';

/** `{disk:NAME}` in the destination's command line: where the disk NAME's image goes */
export const DISK_PLACEHOLDER = /\{disk:([^}]*)\}/g;

/** why QEMU's writes are not reported to livemig (added to each disk's tracker reason) */
export const QEMU_UNREPORTED =
  'QEMU marks its writes only in dirty bitmaps it serves over NBD (qemu:dirty-bitmap), which livemig does not read: the image is compared instead';

/** what QEMU says of a drive with a medium (query-block's `inserted`, query-named-block-nodes' entries) */
interface BlockNode {
  'node-name'?: string;
  drv?: string;
  file?: string;
  backing_file?: string;
  backing_file_depth?: number;
  image?: { 'virtual-size'?: number; format?: string };
}

interface BlockInfo {
  device?: string;
  qdev?: string;
  inserted?: BlockNode;
}

const PROTOCOLS = new Set(['file', 'host_device']);

function refused(why: string): LivemigError {
  return new LivemigError('ERR_LIVEMIG_QEMU', why, { phase: 'qemu' });
}

/** The name a drive goes by: its -drive id, else its node's name (QEMU's own `#block...` names are not stable). */
function driveName(b: BlockInfo): string | undefined {
  if (typeof b.device === 'string' && GUEST_NAME.test(b.device)) return b.device;
  const node = b.inserted?.['node-name'];
  return typeof node === 'string' && GUEST_NAME.test(node) ? node : undefined;
}

/** The drives with a medium, each with its name; refused when QEMU's answer is not a list of them. */
async function drives(qmp: QmpClient): Promise<{ name: string | undefined; info: BlockInfo; node: BlockNode }[]> {
  const blocks = await qmp.execute<BlockInfo[]>('query-block');
  if (!Array.isArray(blocks)) throw refused(`query-block answered ${JSON.stringify(blocks).slice(0, 200)}, not a list`);
  return blocks
    .filter((b) => typeof b === 'object' && b !== null && typeof b.inserted === 'object' && b.inserted !== null)
    .map((b) => ({ name: driveName(b), info: b, node: b.inserted! }));
}

/**
 * Where a drive's image is, checked: raw, no backing file, over a local file or block device,
 * the whole of it. The refusal names the disk and what it is.
 */
function rawImage(label: string, node: BlockNode, nodes: BlockNode[]): { file: string; size: number } {
  const file = node.file;
  if (node.backing_file_depth || node.backing_file)
    throw refused(`disk ${label}: ${file} has a backing chain (${node.backing_file ?? 'depth ' + node.backing_file_depth}): livemig moves raw images only`);
  if (node.drv !== 'raw' && !PROTOCOLS.has(node.drv ?? ''))
    throw refused(`disk ${label}: ${file} is ${node.drv} (livemig moves raw images on local storage only; qemu-img convert -O raw makes one)`);
  const size = node.image?.['virtual-size'];
  if (typeof file !== 'string' || !file.startsWith('/'))
    throw refused(`disk ${label}: ${JSON.stringify(file)} is not a local file or block device (network storage stays where it is: not supported)`);
  const protocol = PROTOCOLS.has(node.drv!) ? node : nodes.find((n) => PROTOCOLS.has(n.drv ?? '') && n.file === file);
  if (!protocol) throw refused(`disk ${label}: ${file} is not a local file or block device QEMU opened (network storage is not supported)`);
  if (!Number.isSafeInteger(size) || size! <= 0 || size! % DISK_BLOCK !== 0)
    throw refused(`disk ${label}: ${file} holds ${size} bytes, not whole ${DISK_BLOCK}-byte blocks`);
  // a raw node over part of its file (offset=, size=) would move bytes the guest does not see as its disk
  if (protocol.image?.['virtual-size'] !== size)
    throw refused(`disk ${label}: the raw node is ${size} bytes of a ${protocol.image?.['virtual-size']}-byte ${file} (offset= or size=): not supported`);
  return { file, size: size! };
}

/**
 * The VM's disks (a drive with a medium each), opened read-only through /proc/PID/root: refused,
 * nothing opened, unless every one is a raw image on local storage livemig can move.
 */
export async function qemuDisks(qmp: QmpClient): Promise<SourceDisk[]> {
  const found = await drives(qmp);
  if (found.length === 0) return [];
  if (found.length > MAX_DISKS) throw refused(`the VM has ${found.length} disks: livemig moves at most ${MAX_DISKS}`);
  const nodes = await qmp.execute<BlockNode[]>('query-named-block-nodes', { flat: true });
  if (!Array.isArray(nodes)) throw refused(`query-named-block-nodes answered ${JSON.stringify(nodes).slice(0, 200)}, not a list`);
  const images = found.map((d) => {
    const label = d.name || d.info.device || d.node['node-name'] || '?';
    if (d.name === undefined)
      throw refused(`disk ${label}: name it (-drive id=NAME, or -blockdev node-name=NAME; 1..63 of [A-Za-z0-9._-]): the destination places disks by name`);
    return { name: d.name, ...rawImage(label, d.node, nodes) };
  });
  const opened: SourceDisk[] = [];
  try {
    for (const image of images) opened.push(openDisk(qmp.pid, image));
    return opened;
  } catch (e) {
    for (const d of opened) closeSync(d.fd);
    throw e;
  }
}

function openDisk(pid: number, image: { name: string; file: string; size: number }): SourceDisk {
  // QEMU may see another mount namespace: the path is opened in QEMU's root
  const where = `/proc/${pid}/root${image.file}`;
  let fd: number;
  try {
    fd = openSync(where, 'r');
  } catch (e) {
    throw new LivemigError('ERR_LIVEMIG_QEMU', `disk ${image.name}: cannot open ${image.file} as QEMU sees it: ${(e as Error).message}`, {
      phase: 'qemu',
      cause: e,
    });
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) throw refused(`disk ${image.name}: ${image.file} is neither a file nor a block device`);
    if (st.isFile() && st.size !== image.size) throw refused(`disk ${image.name}: ${image.file} holds ${st.size} bytes, QEMU says ${image.size}`);
    if (!holdsOpen(pid, st.dev, st.ino)) throw refused(`disk ${image.name}: QEMU (pid ${pid}) has no descriptor of ${image.file}: is it this VM's disk?`);
    return { name: image.name, size: image.size, fd, path: where, trackingNote: QEMU_UNREPORTED };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** Whether process `pid` has the file (dev, ino) open. */
function holdsOpen(pid: number, dev: number, ino: number): boolean {
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const st = statSync(`/proc/${pid}/fd/${fd}`);
      if (st.dev === dev && st.ino === ino) return true;
    } catch {
      // closed since the listing, or not a file (an anonymous inode): not the image
    }
  }
  return false;
}

/** The disk names `{disk:NAME}` places in a command line, each once; a bad or repeated name is refused. */
export function placedDisks(words: readonly string[]): string[] {
  const names: string[] = [];
  for (const w of words)
    for (const m of w.matchAll(DISK_PLACEHOLDER)) {
      const name = m[1]!;
      if (!GUEST_NAME.test(name)) throw invalid(`{disk:${name}}: a disk's name is 1..63 characters of [A-Za-z0-9._-]`);
      if (names.includes(name)) throw invalid(`{disk:${name}} appears twice: each disk has one image`);
      names.push(name);
    }
  return names;
}

function invalid(why: string): LivemigError {
  return new LivemigError('ERR_LIVEMIG_INVALID_ARGUMENT', why, { phase: 'validate' });
}

/**
 * The source's disks against the names a destination's command line places: each must be
 * placed, and none placed that the source lacks. `undefined`: they match.
 */
export function disksMismatch(source: readonly string[], placed: readonly string[]): string | undefined {
  const missing = source.filter((n) => !placed.includes(n));
  const extra = placed.filter((n) => !source.includes(n));
  const why: string[] = [];
  if (missing.length)
    why.push(`the source VM's disk(s) ${missing.join(', ')} have no place in the QEMU command (${missing.map((n) => `{disk:${n}}`).join(' ')})`);
  if (extra.length) why.push(`the QEMU command places disk(s) ${extra.join(', ')}, which the source VM does not have`);
  return why.length ? why.join('; ') : undefined;
}

/** a path QEMU's option syntax (`,` separates options) and the shell take as it is */
const PLAIN_PATH = /^\/[A-Za-z0-9._/+-]*$/;

/** Why an image path cannot go into QEMU's command line as it is (undefined: it can). */
export function unplainPath(p: string): string | undefined {
  return PLAIN_PATH.test(p)
    ? undefined
    : `${JSON.stringify(p)} is not a plain absolute path (${PLAIN_PATH}): QEMU's options and the shell would read it otherwise`;
}

/** Puts each image's path where its `{disk:NAME}` is. */
export function placeDisks(word: string, disks: readonly { name: string; path: string }[]): string {
  return word.replaceAll(DISK_PLACEHOLDER, (_all, name: string) => {
    const d = disks.find((x) => x.name === name);
    if (!d) throw invalid(`{disk:${name}}: the source VM has no disk ${name}`);
    const why = unplainPath(d.path);
    if (why) throw invalid(`disk ${name}'s image: ${why}`);
    return d.path;
  });
}

/** The destination QEMU's disks must be exactly the source's, each a raw node on livemig's image. */
export async function checkIncomingDisks(qmp: QmpClient, disks: readonly { name: string; path: string }[]): Promise<void> {
  const refuse = (why: string): LivemigError => new LivemigError('ERR_LIVEMIG_QEMU', `the destination QEMU: ${why}`, { phase: 'reserve' });
  const found = await drives(qmp);
  for (const d of found) {
    const want = disks.find((x) => x.name === d.name);
    const label = d.name || d.info.device || d.node['node-name'];
    if (!want) throw refuse(`it has disk ${label} (${d.node.file}), which the source VM does not have`);
    if (d.node.drv !== 'raw' && !PROTOCOLS.has(d.node.drv ?? '')) throw refuse(`disk ${label} is ${d.node.drv}: livemig's image is raw (format=raw)`);
    if (d.node.file !== want.path) throw refuse(`disk ${label} is ${d.node.file}, not livemig's image ${want.path} ({disk:${want.name}})`);
  }
  const missing = disks.filter((x) => !found.some((d) => d.name === x.name));
  if (missing.length) throw refuse(`it has no disk ${missing.map((d) => d.name).join(', ')} (-drive id=NAME or node-name=NAME, file={disk:NAME})`);
}
