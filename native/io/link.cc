// A migration connection's descriptor and record layer (see link.h).
#include "io/link.h"

#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>

namespace livemig {

bool Link::Encrypt(const DirectionKey& send, const DirectionKey& receive, uint64_t received, SysError& err) {
  auto tx = std::make_unique<RecordSender>();
  auto rx = std::make_unique<RecordReceiver>();
  if (!tx->Init(send, err) || !rx->Init(receive, err)) return false;
  rx->StartAt(received);
  tx_ = std::move(tx), rx_ = std::move(rx);
  return true;
}

long Link::Unread() const {
  int queued = 0;
  if (ioctl(fd_, FIONREAD, &queued) != 0) return -1;
  return static_cast<long>(queued) + static_cast<long>(rx_ ? rx_->buffered() : 0);
}

bool Link::Send(iovec* iov, int n, size_t head, SysError& err) { return tx_ ? tx_->Send(fd_, iov, n, head, err) : SendAll(fd_, iov, n, err); }

bool Link::Recv(iovec* iov, int n, bool atFrameStart, SysError& err) {
  return rx_ ? rx_->RecvAll(fd_, iov, n, atFrameStart, err) : RecvAll(fd_, iov, n, atFrameStart, err);
}

ssize_t Link::RecvSome(iovec* iov, int n, SysError& err) {
  if (rx_) return rx_->RecvSome(fd_, iov, n, err);
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = static_cast<size_t>(std::min(n, kMaxIov));
  ssize_t got = recvmsg(fd_, &msg, MSG_DONTWAIT);
  if (got < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
    return err.set("recvmsg", errno), -1;
  }
  if (got == 0) return err.fail("ERR_LIVEMIG_CONNECTION", "the peer closed the connection"), -1;
  return got;
}

}  // namespace livemig
