// Blocking socket I/O: whole iovec lists sent and received across partial transfers.
#include "io/socket.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>

#include "wire/format.h"

namespace livemig {

using wire::kPageSize;

// Sends every byte of iov[0..n); advances through partial sends.
bool SendAll(int fd, iovec* iov, int n, SysError& err) {
  while (n > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min(n, kMaxIov);
    ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;  // a signal arrived before any byte went: retry
      // EAGAIN here means SO_SNDTIMEO expired (the peer stopped reading); EPIPE/ECONNRESET the peer went away
      if (errno == EAGAIN || errno == EWOULDBLOCK) err.fail("ERR_LIVEMIG_TIMEOUT", "the peer took no byte within the send timeout: it stopped reading");
      else err.set("sendmsg", errno);
      return false;
    }
    size_t left = static_cast<size_t>(sent);
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

// Receives exactly the bytes of iov[0..n). `what` names the part of the frame for errors.
// Returns false with err set: an orderly close or reset mid-frame is a connection error.
bool RecvAll(int fd, iovec* iov, int n, bool atFrameStart, SysError& err) {
  bool any = false;
  while (n > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min(n, kMaxIov);
    ssize_t got = recvmsg(fd, &msg, MSG_WAITALL);
    if (got < 0) {
      if (errno == EINTR) continue;  // interrupted before data: retry
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        err.fail("ERR_LIVEMIG_TIMEOUT", "no data from the peer within the idle timeout");
      } else {
        err.set("recvmsg", errno);  // ECONNRESET, or EINVAL/ENOTCONN after a local shutdown
      }
      return false;
    }
    if (got == 0) {
      err.fail("ERR_LIVEMIG_CONNECTION", atFrameStart && !any ? "the peer closed the connection" : "the peer closed the connection in the middle of a frame");
      return false;
    }
    any = true;
    size_t left = static_cast<size_t>(got);
    while (n > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return true;
}

bool RecvBytes(int fd, void* p, size_t len, bool atFrameStart, SysError& err) {
  if (len == 0) return true;
  iovec v{p, len};
  return RecvAll(fd, &v, 1, atFrameStart, err);
}

// Appends iovecs covering the given pages of the region, one per run of consecutive pages.
void PageIovecs(uint8_t* base, const uint32_t* idx, size_t count, std::vector<iovec>& out) {
  for (size_t k = 0; k < count;) {
    size_t run = 1;
    while (k + run < count && idx[k + run] == idx[k] + run) run++;
    out.push_back({base + static_cast<uint64_t>(idx[k]) * kPageSize, run * kPageSize});
    k += run;
  }
}

}  // namespace livemig
