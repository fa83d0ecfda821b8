// Unix-socket descriptor passing (SCM_RIGHTS): a guest process hands its memfd (and later
// its userfaultfd) to livemig. One framed message: u32 little-endian length, then payload;
// the descriptors ride on the first byte. After this exchange both sides wrap the socket in
// a net.Socket for ordinary messages.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common.h"

namespace livemig {

namespace {

constexpr size_t kMaxFds = 16;
constexpr uint32_t kMaxPayload = 1 << 20;

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

Napi::Value Send(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  Napi::Buffer<uint8_t> payload = info[1].As<Napi::Buffer<uint8_t>>();
  Napi::Array fdList = info[2].As<Napi::Array>();
  size_t nfds = fdList.Length();
  if (nfds > kMaxFds || payload.Length() > kMaxPayload) throw MakeSysError(env, "sendmsg", EMSGSIZE);
  std::vector<uint8_t> frame(4 + payload.Length());
  uint32_t len = static_cast<uint32_t>(payload.Length());
  for (int i = 0; i < 4; i++) frame[i] = static_cast<uint8_t>(len >> (8 * i));
  std::memcpy(frame.data() + 4, payload.Data(), payload.Length());

  char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  size_t sent = 0;
  bool fdsSent = nfds == 0;
  while (sent < frame.size()) {
    struct iovec iov = {frame.data() + sent, frame.size() - sent};
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!fdsSent) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
      struct cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
      int* fds = reinterpret_cast<int*>(CMSG_DATA(c));
      for (size_t i = 0; i < nfds; i++) fds[i] = fdList.Get(static_cast<uint32_t>(i)).As<Napi::Number>().Int32Value();
    }
    ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;  // interrupted before anything was sent: retry
      if (errno == EAGAIN) {         // non-blocking socket full: wait until writable
        struct pollfd p = {fd, POLLOUT, 0};
        poll(&p, 1, 1000);
        continue;
      }
      throw MakeSysError(env, "sendmsg", errno);
    }
    fdsSent = true;
    sent += static_cast<size_t>(w);
  }
  return env.Undefined();
}

struct Received {
  std::vector<uint8_t> data;
  std::vector<int> fds;
};

bool ReadExactly(int fd, uint8_t* buf, size_t n, int timeoutMs, std::vector<int>* fds, SysError* err) {
  size_t got = 0;
  while (got < n) {
    if (WaitReadable(fd, timeoutMs, err) != 0) return false;
    struct iovec iov = {buf + got, n - got};
    char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    struct msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    ssize_t r = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;  // spurious wakeup: poll again
      err->set("recvmsg", errno);
      return false;
    }
    if (r == 0) {
      err->set("recvmsg", ECONNRESET, "peer closed the socket");
      return false;
    }
    for (struct cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int* p = reinterpret_cast<int*>(CMSG_DATA(c));
        for (size_t i = 0; i < k; i++) fds->push_back(p[i]);
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
      err->set("recvmsg", EMSGSIZE, "too many descriptors");
      return false;
    }
    got += static_cast<size_t>(r);
  }
  return true;
}

Napi::Value Recv(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  int timeoutMs = info[1].As<Napi::Number>().Int32Value();
  return Task<Received>::Start(
      info.Env(),
      [fd, timeoutMs](Received& out, SysError& err) {
        uint8_t hdr[4];
        bool ok = ReadExactly(fd, hdr, 4, timeoutMs, &out.fds, &err);
        if (ok) {
          uint32_t len = hdr[0] | hdr[1] << 8 | hdr[2] << 16 | static_cast<uint32_t>(hdr[3]) << 24;
          if (len > kMaxPayload) {
            err.set("recvmsg", EMSGSIZE, "message of " + std::to_string(len) + " bytes");
            ok = false;
          } else {
            out.data.resize(len);
            ok = ReadExactly(fd, out.data.data(), len, timeoutMs, &out.fds, &err);
          }
        }
        if (!ok) {
          for (int f : out.fds) close(f);  // never leak descriptors from a failed exchange
          out.fds.clear();
        }
      },
      [](Napi::Env env, Received& r) -> Napi::Value {
        Napi::Object o = Napi::Object::New(env);
        o.Set("data", Napi::Buffer<uint8_t>::Copy(env, r.data.data(), r.data.size()));
        Napi::Array fds = Napi::Array::New(env, r.fds.size());
        for (size_t i = 0; i < r.fds.size(); i++) fds.Set(static_cast<uint32_t>(i), Napi::Number::New(env, r.fds[i]));
        o.Set("fds", fds);
        return o;
      });
}

}  // namespace

void InitFdPass(Napi::Env env, Napi::Object exports) {
  exports.Set("unixListen", Napi::Function::New(env, Listen));
  exports.Set("unixConnect", Napi::Function::New(env, Connect));
  exports.Set("unixAccept", Napi::Function::New(env, Accept));
  exports.Set("sendWithFds", Napi::Function::New(env, Send));
  exports.Set("recvWithFds", Napi::Function::New(env, Recv));
}

}  // namespace livemig
