// Post-copy mechanism: the destination's fault service and the source's page server.
//
// Destination. The guest maps the region (a memfd) and registers its mapping with userfaultfd
// for MINOR faults (UFFD_FEATURE_MINOR_SHMEM): every page is already in the memfd's page
// cache (the receiver reserved and populated it through its own mapping), so the guest's first
// touch of a page it has not been given raises a minor fault. livemig writes an arriving page
// through its own mapping (the data lands straight from the socket, no copy) and then maps it
// into the guest with UFFDIO_CONTINUE, which wakes whoever waits on it. Minor faults rather than
// missing faults + UFFDIO_COPY because the page is already where it must end up: UFFDIO_COPY
// would copy every page a second time, and a memfd holding holes could not be reserved ahead.
// One native thread owns the uffd and both post-copy sockets, so the per-page state needs no
// locks: missing -> requested (a fault waits) -> mapped, or missing -> arrived -> mapped.
// A page is written only while missing or requested; the guest cannot see it before CONTINUE.
//
// Source. The guest is paused; its pages are read straight from the region. A server thread
// answers page requests on the priority connection; push() sends pages in the background on the
// other one. A per-page claim (atomic) makes each page go once, by whichever takes it first.
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "postcopy/postcopy.h"
#include "tracking/tracking.h"

#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif

namespace livemig {

namespace {

// ---------------------------------------------------------------- guest side and fd transfer

// Registers [address, address+length) of *this* process (a shared-memory mapping) for minor
// faults and returns the userfaultfd: the guest calls this on its own memory before it resumes.
Napi::Value UffdRegisterMinor(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t address = ToU64(info[0]);
  uint64_t length = ToU64(info[1]);
  SysError err;
  int fd = OpenUffd(&err);
  if (fd < 0) throw MakeSysError(env, err);
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_MINOR_SHMEM;
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "ioctl(UFFDIO_API)", e, "minor faults on shared memory (UFFD_FEATURE_MINOR_SHMEM)");
  }
  uffdio_register reg{};
  reg.range.start = address;
  reg.range.len = length;
  reg.mode = UFFDIO_REGISTER_MODE_MINOR;
  if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "ioctl(UFFDIO_REGISTER)", e, "mode MINOR");
  }
  if (!(reg.ioctls & (1ULL << _UFFDIO_CONTINUE))) {
    close(fd);
    throw MakeSysError(env, "ioctl(UFFDIO_REGISTER)", EINVAL, "the range does not support UFFDIO_CONTINUE");
  }
  return Napi::Number::New(env, fd);
}

// packBits(bytes: Uint8Array) -> Buffer: one bit per entry (entry p: byte p>>3, bit p&7), set where nonzero.
// Per-page loops in JavaScript run once per migration, in the interpreter, inside the pause: here instead.
Napi::Value PackBits(const Napi::CallbackInfo& info) {
  Napi::Uint8Array in = info[0].As<Napi::Uint8Array>();
  size_t n = in.ElementLength();
  const uint8_t* src = in.Data();
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(info.Env(), (n + 7) / 8);
  uint8_t* dst = out.Data();
  // eight entries a bitmap byte, on raw pointers: this runs inside a pause (262144 entries a GiB)
  for (size_t b = 0; b < out.Length(); b++) {
    uint8_t v = 0;
    for (size_t k = 0; k < 8 && 8 * b + k < n; k++) v |= static_cast<uint8_t>((src[8 * b + k] != 0) << k);
    dst[b] = v;
  }
  return out;
}

// unpackBits(bits: Uint8Array, count, into?: Uint8Array) -> {bytes: Uint8Array (0/1 per entry), set: number}
// `into` (count bytes) lets a caller use memory it touched ahead, outside a pause.
Napi::Value UnpackBits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Uint8Array bits = info[0].As<Napi::Uint8Array>();
  size_t n = static_cast<size_t>(info[1].As<Napi::Number>().Int64Value());
  if (bits.ElementLength() != 0 && bits.ElementLength() < (n + 7) / 8) throw Napi::RangeError::New(env, "bitmap shorter than its count");
  if (info[2].IsTypedArray() && info[2].As<Napi::Uint8Array>().ElementLength() != n) throw Napi::RangeError::New(env, "into must hold count bytes");
  Napi::Uint8Array out = info[2].IsTypedArray() ? info[2].As<Napi::Uint8Array>() : Napi::Uint8Array::New(env, n);
  uint8_t* dst = out.Data();
  uint64_t set = 0;
  if (bits.ElementLength() == 0) {
    std::memset(dst, 0, n);
  } else {
    const uint8_t* src = bits.Data();
    for (size_t p = 0; p < n; p++) {
      uint8_t v = (src[p >> 3] >> (p & 7)) & 1;
      dst[p] = v;
      set += v;
    }
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("bytes", out);
  r.Set("set", static_cast<double>(set));
  return r;
}

}  // namespace

void InitPostcopy(Napi::Env env, Napi::Object exports) {
  exports.Set("PostcopyDest", postcopy::DestClass(env));
  exports.Set("PostcopySource", postcopy::SourceClass(env));
  exports.Set("uffdRegisterMinor", Napi::Function::New(env, UffdRegisterMinor));
  exports.Set("packBits", Napi::Function::New(env, PackBits));
  exports.Set("unpackBits", Napi::Function::New(env, UnpackBits));
}

}  // namespace livemig
