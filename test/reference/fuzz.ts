/**
 * Seeded mutations of livemig frames, for the fuzz test (test/fuzz.test.ts) and bench/fuzz: a
 * case is a connection to a receiver that sends a valid HELLO (or a mutated one) and, once it
 * is answered (as a source waits for ACCEPT), one frame of any type, valid to begin with and then mutated: bits flipped, bytes cut or added,
 * header fields (version, type, flags, length) replaced. Deterministic for a seed.
 */
import { FrameType, MAX_FRAME_TYPE, PROTOCOL_VERSION } from '../../src/protocol/format.js';
import { encodeFrame } from '../../src/protocol/frame.js';
import * as M from '../../src/protocol/messages.js';
import { pagesFrameBytes, writePagesPrefix } from './frames.js';

/** xorshift64*: small, fast, and the same sequence everywhere for a seed */
export class Rng {
  #s: bigint;
  constructor(seed: bigint) {
    this.#s = seed === 0n ? 0x9e3779b97f4a7c15n : seed;
  }
  next(): number {
    let x = this.#s;
    x ^= x >> 12n;
    x ^= (x << 25n) & 0xffffffffffffffffn;
    x ^= x >> 27n;
    this.#s = x;
    return Number(((x * 0x2545f4914f6cdd1dn) & 0xffffffffffffffffn) >> 11n) / 2 ** 53;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
}

export const FUZZ_PAGES = 16;
const V = PROTOCOL_VERSION;

export function validHello(): Buffer {
  return M.encodeHello({
    versions: [1, V],
    regionBytes: FUZZ_PAGES * 4096,
    pageSize: 4096,
    auth: null,
    capabilities: ['encodings', 'commit-activate', 'resolve'],
  });
}

/** A valid frame of `type` for a receiver of FUZZ_PAGES pages. */
function validFrame(type: FrameType, rng: Rng): Buffer {
  const session = 'ab'.repeat(16);
  switch (type) {
    case FrameType.Hello:
      return validHello();
    case FrameType.Pages: {
      const pages = Uint32Array.from([rng.int(FUZZ_PAGES)]);
      const b = Buffer.alloc(pagesFrameBytes(1, 4096), rng.int(256));
      writePagesPrefix(b, 1, pages, V);
      return b;
    }
    case FrameType.PagesEnc: {
      // one zero page: prefix, index, encoding
      const payload = Buffer.alloc(8 + 5);
      payload.writeUInt32LE(1, 0);
      payload.writeUInt32LE(1, 4);
      payload.writeUInt32LE(rng.int(FUZZ_PAGES), 8);
      payload[12] = 1;
      return encodeFrame(FrameType.PagesEnc, payload, V);
    }
    case FrameType.RoundEnd:
      return M.encodeRoundEnd({ round: 1, pages: rng.int(FUZZ_PAGES) }, V);
    case FrameType.RoundAck:
      return M.encodeRoundAck({ round: 1, pages: 1 }, V);
    case FrameType.DeviceState:
      return M.encodeDeviceState(Buffer.alloc(rng.int(64), 7), V, { prove: rng.int(2) === 1 });
    case FrameType.Commit:
      return M.encodeCommit({ digest: BigInt(rng.int(2 ** 31)), pageCount: FUZZ_PAGES, ...(rng.int(2) ? { activate: true } : {}) }, V);
    case FrameType.CommitAck:
      return M.encodeCommitAck({ digest: 1n }, V);
    case FrameType.Activate:
      return M.encodeActivate(V);
    case FrameType.Activated:
      return M.encodeActivated({ activateMs: 1 }, V);
    case FrameType.Abort:
      return M.encodeAbort({ reason: 'fuzz' }, V);
    case FrameType.Accept:
      return M.encodeAccept({ version: V, capabilities: [] }, V);
    case FrameType.Error:
      return M.encodeError({ code: 'ERR_LIVEMIG_PROTOCOL', message: 'fuzz', phase: 'fuzz' }, V);
    case FrameType.ImageHashes:
      return M.encodeImageHashes(new BigUint64Array(FUZZ_PAGES), V);
    case FrameType.Postcopy:
      return M.encodePostcopy({ needed: Buffer.alloc(FUZZ_PAGES / 8, 0xff) }, V);
    case FrameType.PostcopyRunning:
      return M.encodePostcopyRunning({ activateMs: 1 }, V);
    case FrameType.Attach:
      return M.encodeAttach({ session, role: 'push' }, V);
    case FrameType.Attached:
      return M.encodeAttached({ held: Buffer.alloc(0) }, V);
    case FrameType.Digest:
      return M.encodeDigest({ digest: 5n, pageCount: FUZZ_PAGES }, V);
    case FrameType.Resolve:
      return M.encodeResolve({ session }, V);
    case FrameType.Resolved:
      return M.encodeResolved({ outcome: 'activated' }, V);
    default:
      // binary post-copy frames (PageRequest, PostcopyComplete): a header and a few bytes
      return encodeFrame(type, Buffer.alloc(4 + rng.int(12), rng.int(256)), V);
  }
}

export type Mutation = 'bits' | 'truncate' | 'extend' | 'header' | 'none';
const MUTATIONS: readonly Mutation[] = ['bits', 'truncate', 'extend', 'header', 'none'];

function mutate(frame: Buffer, rng: Rng): { bytes: Buffer; mutation: Mutation } {
  const mutation = MUTATIONS[rng.int(MUTATIONS.length)]!;
  const b = Buffer.from(frame);
  switch (mutation) {
    case 'bits':
      for (let k = 1 + rng.int(4); k > 0; k--) b[rng.int(b.length)]! ^= 1 << rng.int(8);
      return { bytes: b, mutation };
    case 'truncate':
      return { bytes: b.subarray(0, rng.int(b.length)), mutation };
    case 'extend':
      return { bytes: Buffer.concat([b, Buffer.alloc(1 + rng.int(64), rng.int(256))]), mutation };
    case 'header': {
      const field = rng.int(4);
      if (field === 0)
        b[2] = rng.int(256); // version
      // type, a few past the last (not RESOLVE on a HELLO: that connection would be a question, not a migration)
      else if (field === 1) b[3] = ((t) => (t === FrameType.Resolve && frame[3] === FrameType.Hello ? 99 : t))(rng.int(MAX_FRAME_TYPE + 3));
      else if (field === 2)
        b.writeUInt16LE(rng.int(65536), 4); // flags
      else b.writeUInt32LE(rng.int(2) ? rng.int(1 << 27) : rng.int(b.length + 16), 8); // length
      return { bytes: b, mutation };
    }
    default:
      return { bytes: b, mutation };
  }
}

export interface FuzzCase {
  /** what the client sends first; then, once the receiver has answered it, `then`; then it closes */
  first: Buffer;
  then?: Buffer;
  type: FrameType;
  mutation: Mutation;
  /** the HELLO itself is the mutated frame */
  helloMutated: boolean;
}

export function fuzzCase(rng: Rng): FuzzCase {
  const type = (1 + rng.int(MAX_FRAME_TYPE)) as FrameType;
  const m = mutate(validFrame(type, rng), rng);
  if (type === FrameType.Hello) return { first: m.bytes, type, mutation: m.mutation, helloMutated: true };
  return { first: validHello(), then: m.bytes, type, mutation: m.mutation, helloMutated: false };
}
