// Errors from the kernel and from peers, as JavaScript errors (src/native.ts turns them into
// LivemigError at the TypeScript call site). Shared by both addons.
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace livemig {

const char* ErrnoName(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE";
    case EMFILE: return "EMFILE";
    case ENOSPC: return "ENOSPC";
    case ENOSYS: return "ENOSYS";
    case ENOTTY: return "ENOTTY";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ECONNRESET: return "ECONNRESET";
    case EPIPE: return "EPIPE";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EADDRINUSE: return "EADDRINUSE";
    case ENOTCONN: return "ENOTCONN";
    case EMSGSIZE: return "EMSGSIZE";
    case ENODEV: return "ENODEV";
    case ECONNABORTED: return "ECONNABORTED";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case ENETUNREACH: return "ENETUNREACH";
    case EROFS: return "EROFS";
    case ENXIO: return "ENXIO";
    case EPROTO: return "EPROTO";
    default: {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
      // the C library's own name for the rest (glibc >= 2.32): never a bare "E?" where it knows one
      const char* name = strerrorname_np(err);
      if (name) return name;
#endif
      return "E?";
    }
  }
}

Napi::Error MakeSysError(Napi::Env env, const char* syscall, int err, const std::string& detail) {
  std::string msg = std::string(syscall) + " failed: " + ErrnoName(err) + " (" + std::strerror(err) + ")";
  if (!detail.empty()) msg += ": " + detail;
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("syscall", Napi::String::New(env, syscall));
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("errnoName", Napi::String::New(env, ErrnoName(err)));
  return e;
}

Napi::Error MakeSysError(Napi::Env env, const SysError& e) {
  if (!e.code.empty()) {
    Napi::Error err = Napi::Error::New(env, e.detail);
    err.Set("livemigCode", Napi::String::New(env, e.code));
    return err;
  }
  return MakeSysError(env, e.syscall.c_str(), e.err, e.detail);
}

Napi::Uint32Array PagesToJs(Napi::Env env, std::vector<uint32_t>&& pages) {
  size_t n = pages.size();
  if (n == 0) return Napi::Uint32Array::New(env, 0);
  auto* owned = new std::vector<uint32_t>(std::move(pages));
  Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
      env, owned->data(), n * sizeof(uint32_t), [](Napi::Env, void*, std::vector<uint32_t>* v) { delete v; }, owned);
  return Napi::Uint32Array::New(env, n, ab, 0);
}

}  // namespace livemig
