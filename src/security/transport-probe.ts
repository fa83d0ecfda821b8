/**
 * What `livemig probe` says of the transport: whether the kernel has TLS offload, and why
 * livemig does not use it either way.
 */
import os from 'node:os';
import { addon } from '../native.js';

export interface KernelTlsProbe {
  available: boolean;
  used: false;
  reason: string;
}

const WHY_NOT_USED =
  "livemig seals its own AES-256-GCM records in the native data path (keys from the TLS exporter), from the region into the socket and from the socket into the region; kernel TLS would need TLS's own record keys, which Node's TLS does not hand over";

export function probeKernelTls(): KernelTlsProbe {
  const e = addon.kernelTlsErrno();
  if (e === 0) return { available: true, used: false, reason: `the kernel has TLS offload (TCP_ULP "tls"), not used: ${WHY_NOT_USED}` };
  const name = Object.entries(os.constants.errno).find(([, v]) => v === e)?.[0] ?? (e < 0 ? 'the probe could not open loopback sockets' : `errno ${e}`);
  const cause =
    e === os.constants.errno.ENOENT
      ? 'not built into this kernel (CONFIG_TLS is off): setsockopt(TCP_ULP, "tls") gives ENOENT'
      : `setsockopt(TCP_ULP, "tls") fails with ${name}`;
  return { available: false, used: false, reason: `${cause}; not needed: ${WHY_NOT_USED}` };
}
