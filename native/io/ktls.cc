// Whether this kernel has TLS offload (kernel TLS, the "tls" TCP upper-layer protocol), for
// `livemig probe`. livemig does not use it (see src/security/transport-probe.ts); the probe
// says whether it could.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "common.h"

namespace livemig {

namespace {

// kernelTlsErrno() -> 0 if a connected loopback TCP socket takes TCP_ULP "tls", else the errno
// (ENOENT: not built into this kernel, no module), or -1 if the probe's own sockets failed.
Napi::Value KernelTlsErrno(const Napi::CallbackInfo& info) {
  int result = -1;
  int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), c = -1, a = -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (l >= 0 && bind(l, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 && listen(l, 1) == 0 &&
      getsockname(l, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c >= 0 && connect(c, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 && (a = accept4(l, nullptr, nullptr, SOCK_CLOEXEC)) >= 0) {
      result = setsockopt(c, IPPROTO_TCP, TCP_ULP, "tls", sizeof "tls") == 0 ? 0 : errno;
    }
  }
  for (int fd : {a, c, l})
    if (fd >= 0) close(fd);
  return Napi::Number::New(info.Env(), result);
}

}  // namespace

void InitKernelTls(Napi::Env env, Napi::Object exports) { exports.Set("kernelTlsErrno", Napi::Function::New(env, KernelTlsErrno)); }

}  // namespace livemig
