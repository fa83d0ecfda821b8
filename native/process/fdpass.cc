// Unix stream sockets: listen, connect, accept with a deadline. The guest contract's messages
// on them (descriptors included) are the guest library's framing (guest/livemig_guest.h).
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common.h"

namespace livemig {

namespace {

bool FillAddr(const std::string& path, sockaddr_un* addr, socklen_t* len) {
  std::memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr->sun_path)) return false;
  std::memcpy(addr->sun_path, path.data(), path.size());
  // A leading '@' names an abstract socket (no file to clean up).
  if (!path.empty() && path[0] == '@') addr->sun_path[0] = '\0';
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
  return true;
}

Napi::Value Listen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  sockaddr_un addr;
  socklen_t len;
  if (!FillAddr(path, &addr, &len)) throw MakeSysError(env, "bind", ENAMETOOLONG, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw MakeSysError(env, "socket", errno);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(fd, 16) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "bind/listen", e, path);
  }
  return Napi::Number::New(env, fd);
}

Napi::Value Connect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  sockaddr_un addr;
  socklen_t len;
  if (!FillAddr(path, &addr, &len)) throw MakeSysError(env, "connect", ENAMETOOLONG, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw MakeSysError(env, "socket", errno);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "connect", e, path);
  }
  return Napi::Number::New(env, fd);
}

// Waits up to timeoutMs for fd to become readable. 0 on success.
int WaitReadable(int fd, int timeoutMs, SysError* err) {
  struct pollfd p = {fd, POLLIN, 0};
  for (;;) {
    int r = poll(&p, 1, timeoutMs);
    if (r > 0) return 0;
    if (r == 0) {
      err->set("poll", ETIMEDOUT, "no peer within " + std::to_string(timeoutMs) + " ms");
      return -1;
    }
    if (errno == EINTR) continue;  // a signal, not a failure: wait again
    err->set("poll", errno);
    return -1;
  }
}

Napi::Value Accept(const Napi::CallbackInfo& info) {
  int listenFd = info[0].As<Napi::Number>().Int32Value();
  int timeoutMs = info[1].As<Napi::Number>().Int32Value();
  return Task<int>::Start(
      info.Env(),
      [listenFd, timeoutMs](int& out, SysError& err) {
        if (WaitReadable(listenFd, timeoutMs, &err) != 0) return;
        out = accept4(listenFd, nullptr, nullptr, SOCK_CLOEXEC);
        if (out < 0) err.set("accept4", errno);
      },
      [](Napi::Env env, int& fd) -> Napi::Value { return Napi::Number::New(env, fd); });
}

// unixDup(fd) -> a descriptor of our own for a connection Node accepted (Node closes its own)
Napi::Value Dup(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw MakeSysError(info.Env(), "fcntl(F_DUPFD_CLOEXEC)", errno);
  return Napi::Number::New(info.Env(), copy);
}

// unixPeerClosed(fd) -> whether the peer of an idle connection has closed it, seen without
// reading anything (a guest registered with a daemon says nothing until asked)
Napi::Value PeerClosed(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint8_t b;
  ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  return Napi::Boolean::New(info.Env(), n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR));
}

// unixPeerPid(fd) -> the pid of the process at the other end (SO_PEERCRED: the kernel's word,
// taken when it connected or listened), e.g. the QEMU behind a QMP socket
Napi::Value PeerPid(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) throw MakeSysError(info.Env(), "getsockopt(SO_PEERCRED)", errno);
  return Napi::Number::New(info.Env(), cred.pid);
}

}  // namespace

void InitFdPass(Napi::Env env, Napi::Object exports) {
  exports.Set("unixListen", Napi::Function::New(env, Listen));
  exports.Set("unixConnect", Napi::Function::New(env, Connect));
  exports.Set("unixAccept", Napi::Function::New(env, Accept));
  exports.Set("unixDup", Napi::Function::New(env, Dup));
  exports.Set("unixPeerClosed", Napi::Function::New(env, PeerClosed));
  exports.Set("unixPeerPid", Napi::Function::New(env, PeerPid));
}

}  // namespace livemig
