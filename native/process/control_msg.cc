// The guest contract's framing (see control_msg.h).
#include "process/control_msg.h"

#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace livemig {

double MonotonicMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

namespace {

union FdSpace {
  char buf[CMSG_SPACE(sizeof(int) * kMaxControlFds)];
  cmsghdr align;
};

// n bytes before the deadline; descriptors that come with them go to fds (or are closed)
int ReadExact(int fd, uint8_t* p, size_t n, double deadline, std::vector<int>* fds) {
  while (n > 0) {
    int wait = -1;
    if (deadline >= 0) {
      double left = deadline - MonotonicMs();
      if (left <= 0) return ETIMEDOUT;
      wait = static_cast<int>(left) + 1;
    }
    pollfd pfd{fd, POLLIN, 0};
    int r = poll(&pfd, 1, wait);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    if (r == 0) continue;  // the deadline check above decides
    FdSpace space;
    iovec iov{p, n};
    msghdr m{};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = space.buf;
    m.msg_controllen = sizeof space.buf;
    ssize_t got = recvmsg(fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got < 0) return errno;
    for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      int in[kMaxControlFds];
      std::memcpy(in, CMSG_DATA(c), std::min(k, kMaxControlFds) * sizeof(int));
      for (size_t i = 0; i < k && i < kMaxControlFds; i++) {
        if (fds && fds->size() < kMaxControlFds) fds->push_back(in[i]);
        else close(in[i]);
      }
    }
    if (got == 0) return ECONNRESET;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return 0;
}

}  // namespace

bool WriteMessage(int fd, uint8_t tag, const uint8_t* body, size_t len, const int* fds, size_t nfds) {
  if (len > kMaxControlBody || nfds > kMaxControlFds) return errno = EMSGSIZE, false;
  uint8_t head[5] = {tag, static_cast<uint8_t>(len), static_cast<uint8_t>(len >> 8), static_cast<uint8_t>(len >> 16), static_cast<uint8_t>(len >> 24)};
  iovec iov[2] = {{head, 5}, {const_cast<uint8_t*>(body), len}};
  FdSpace space;
  msghdr m{};
  m.msg_iov = iov;
  m.msg_iovlen = len ? 2 : 1;
  if (nfds) {
    m.msg_control = space.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    cmsghdr* c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    std::memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  size_t left = 5 + len;
  while (left > 0) {
    ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {  // a non-blocking end: wait until it drains
      pollfd pfd{fd, POLLOUT, 0};
      poll(&pfd, 1, 100);
      continue;
    }
    if (w <= 0) return false;
    left -= static_cast<size_t>(w);
    m.msg_control = nullptr, m.msg_controllen = 0;  // the descriptors went with the first bytes
    while (m.msg_iovlen && static_cast<size_t>(w) >= m.msg_iov[0].iov_len) w -= static_cast<ssize_t>(m.msg_iov[0].iov_len), m.msg_iov++, m.msg_iovlen--;
    if (m.msg_iovlen) m.msg_iov[0].iov_base = static_cast<uint8_t*>(m.msg_iov[0].iov_base) + w, m.msg_iov[0].iov_len -= static_cast<size_t>(w);
  }
  return true;
}

int ReadMessage(int fd, uint8_t* tag, std::vector<uint8_t>* body, double deadline, std::vector<int>* fds) {
  uint8_t head[5];
  int err = ReadExact(fd, head, 5, deadline, fds);
  if (err) return err;
  uint32_t len = head[1] | head[2] << 8 | head[3] << 16 | static_cast<uint32_t>(head[4]) << 24;
  if (len > kMaxControlBody) return EPROTO;
  *tag = head[0];
  body->resize(len);
  return len ? ReadExact(fd, body->data(), len, deadline, fds) : 0;
}

Napi::Object MessageObject(Napi::Env env, uint8_t tag, const std::vector<uint8_t>& body, const std::vector<int>& fds) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("tag", Napi::Number::New(env, tag));
  o.Set("body", Napi::Buffer<uint8_t>::Copy(env, body.data(), body.size()));
  Napi::Array a = Napi::Array::New(env, fds.size());
  for (size_t i = 0; i < fds.size(); i++) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
  o.Set("fds", a);
  return o;
}

}  // namespace livemig
