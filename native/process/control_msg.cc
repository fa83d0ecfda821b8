// The guest control socket's framing (see control_msg.h).
#include "process/control_msg.h"

#include <poll.h>
#include <sys/socket.h>
#include <time.h>

#include <cerrno>
#include <cstring>

namespace livemig {

double MonotonicMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

bool WriteAll(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {  // a non-blocking end: wait until it drains
      pollfd pfd{fd, POLLOUT, 0};
      poll(&pfd, 1, 100);
      continue;
    }
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool WriteMessage(int fd, uint8_t tag, const uint8_t* body, uint16_t len) {
  uint8_t buf[3 + kMaxControlBody];
  buf[0] = tag;
  buf[1] = static_cast<uint8_t>(len & 0xff);
  buf[2] = static_cast<uint8_t>(len >> 8);
  if (len) std::memcpy(buf + 3, body, len);
  return WriteAll(fd, buf, 3u + len);
}

int ReadExact(int fd, uint8_t* p, size_t n, double deadline) {
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
    ssize_t got = recv(fd, p, n, MSG_DONTWAIT);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got < 0) return errno;
    if (got == 0) return ECONNRESET;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return 0;
}

int ReadMessage(int fd, uint8_t* tag, std::vector<uint8_t>* body, double deadline) {
  uint8_t head[3];
  int err = ReadExact(fd, head, 3, deadline);
  if (err) return err;
  uint32_t len = head[1] | (static_cast<uint32_t>(head[2]) << 8);
  if (len > kMaxControlBody) return EPROTO;
  *tag = head[0];
  body->resize(len);
  return len ? ReadExact(fd, body->data(), len, deadline) : 0;
}

Napi::Object MessageObject(Napi::Env env, uint8_t tag, const std::vector<uint8_t>& body) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("tag", Napi::Number::New(env, tag));
  o.Set("body", Napi::Buffer<uint8_t>::Copy(env, body.data(), body.size()));
  return o;
}

}  // namespace livemig
