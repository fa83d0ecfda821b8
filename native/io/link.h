// A migration connection as the native data path sees it: the descriptor, and when the stream
// is encrypted (issue 17) its record layer, one sealing and one opening side (io/records.h).
// The Wire owns one; a post-copy service takes it over from the Wire, counters and buffered
// plaintext with it, so a connection's records go on in sequence whoever moves its bytes.
// The descriptor closes when the last holder is gone (a Wire and every operation still using
// it), so a thread blocked in recv never sees its descriptor number reused under it.
#pragma once

#include <sys/uio.h>
#include <unistd.h>

#include <memory>

#include "common.h"
#include "io/records.h"
#include "io/socket.h"

namespace livemig {

class Link {
 public:
  explicit Link(int fd) : fd_(fd) {}
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;
  ~Link() {
    if (fd_ >= 0) close(fd_);
  }

  int fd() const { return fd_; }
  // From now on every byte either way is in records under these keys. Before any frame.
  // `received`: the peer's records already opened before this link (its first frame's).
  bool Encrypt(const DirectionKey& send, const DirectionKey& receive, uint64_t received, SysError& err);
  // Bytes of the peer's that have arrived and are not read yet (buffered plaintext, or still in
  // the socket); -1 with errno when the socket cannot say.
  long Unread() const;
  bool encrypted() const { return tx_ != nullptr; }
  RecordSender* tx() { return tx_.get(); }
  RecordReceiver* rx() { return rx_.get(); }

  // Sends every byte of iov[0..n) (which it may advance); `head` is where the frame's head ends
  // and its page bodies begin (0: no such split), for record boundaries.
  bool Send(iovec* iov, int n, size_t head, SysError& err);
  // Receives exactly the bytes of iov[0..n) (which it may advance).
  bool Recv(iovec* iov, int n, bool atFrameStart, SysError& err);
  bool RecvBytes(void* p, size_t len, bool atFrameStart, SysError& err) {
    if (len == 0) return true;
    iovec v{p, len};
    return Recv(&v, 1, atFrameStart, err);
  }
  // Non-blocking receive into iov[0..n): bytes given, 0 if none without waiting, -1 with err.
  ssize_t RecvSome(iovec* iov, int n, SysError& err);
  // Whether bytes wait in this side's buffer that no poll on the descriptor would announce.
  bool HasBuffered() const { return rx_ && rx_->buffered() > 0; }

 private:
  int fd_;
  std::unique_ptr<RecordSender> tx_;
  std::unique_ptr<RecordReceiver> rx_;
};

}  // namespace livemig
