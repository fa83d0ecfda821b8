// The encrypted stream's records (see records.h).
#include "io/records.h"

#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

#include "io/bytes.h"
#include "io/socket.h"

namespace livemig {

namespace {

size_t TotalOf(const iovec* iov, int n) {
  size_t t = 0;
  for (int k = 0; k < n; k++) t += iov[k].iov_len;
  return t;
}

// Walks an iovec list, handing out the next `len` bytes as iovecs of their own.
struct IovCursor {
  const iovec* iov;
  int n;
  int k = 0;
  size_t off = 0;
  void Take(size_t len, std::vector<iovec>& out) {
    out.clear();
    while (len > 0 && k < n) {
      size_t avail = iov[k].iov_len - off;
      if (avail == 0) {
        k++, off = 0;
        continue;
      }
      size_t t = std::min(avail, len);
      out.push_back({static_cast<uint8_t*>(iov[k].iov_base) + off, t});
      off += t, len -= t;
    }
  }
};

}  // namespace

// ---------------------------------------------------------------- sending

bool RecordSender::Init(const DirectionKey& k, SysError& err) {
  buf_.resize(kRecordMax + kRecordOverhead);
  buf_.resize(0);
  return aead_.Init(k.key, k.salt, err);
}

// Cuts iov[0..n) into records: the first `head` bytes as one (when head is nonzero and shorter
// than the whole), the rest in records of up to kRecordMax; calls each(parts, len) per record.
template <typename Each>
bool ForEachRecord(const iovec* iov, int n, size_t head, std::vector<iovec>& parts, Each each) {
  IovCursor cur{iov, n};
  size_t left = TotalOf(iov, n);
  for (bool first = true; left > 0; first = false) {
    size_t len = std::min(left, kRecordMax);
    if (first && head > 0 && head < len) len = head;
    cur.Take(len, parts);
    if (!each(parts, len)) return false;
    left -= len;
  }
  return true;
}

template <typename Out>
bool RecordSender::SealOne(const std::vector<iovec>& parts, size_t len, Out& out, SysError& err) {
  size_t at = out.size();
  out.resize(at + kRecordHeadBytes + len + kAeadTagBytes);
  uint8_t* rec = out.data() + at;
  Put32(rec, static_cast<uint32_t>(len));
  return aead_.Seal(rec, kRecordHeadBytes, parts.data(), static_cast<int>(parts.size()), len, rec + kRecordHeadBytes, err);
}

template <typename Out>
bool RecordSender::SealRecords(const iovec* iov, int n, size_t head, Out& out, SysError& err) {
  return ForEachRecord(iov, n, head, sub_, [&](const std::vector<iovec>& parts, size_t len) { return SealOne(parts, len, out, err); });
}

bool RecordSender::Send(int fd, const iovec* iov, int n, size_t head, SysError& err) {
  if (!Flush(fd, err)) return false;
  // one record at a time: sealed into a buffer that stays in cache, then sent from it
  return ForEachRecord(iov, n, head, sub_, [&](const std::vector<iovec>& parts, size_t len) {
    buf_.resize(0);
    if (!SealOne(parts, len, buf_, err)) return false;
    iovec v{buf_.data(), buf_.size()};
    return SendAll(fd, &v, 1, err);
  });
}

bool RecordSender::SendNow(int fd, const iovec* iov, int n, bool& waiting, SysError& err) {
  if (waitingAt_ == waiting_.size()) waiting_.clear(), waitingAt_ = 0;
  if (!SealRecords(iov, n, 0, waiting_, err)) return false;
  while (waitingAt_ < waiting_.size()) {
    ssize_t sent = send(fd, waiting_.data() + waitingAt_, waiting_.size() - waitingAt_, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;  // full: the rest waits for a Flush
      return err.set("send", errno), false;
    }
    waitingAt_ += static_cast<size_t>(sent);
  }
  waiting = waitingAt_ < waiting_.size();
  return true;
}

bool RecordSender::Flush(int fd, SysError& err) {
  if (waitingAt_ == waiting_.size()) return true;
  iovec v{waiting_.data() + waitingAt_, waiting_.size() - waitingAt_};
  if (!SendAll(fd, &v, 1, err)) return false;
  waiting_.clear(), waitingAt_ = 0;
  return true;
}

bool RecordSender::SealInto(const uint8_t* p, size_t len, std::vector<uint8_t>& out, SysError& err) {
  iovec v{const_cast<uint8_t*>(p), len};
  return SealRecords(&v, 1, 0, out, err);
}

// ---------------------------------------------------------------- receiving

bool RecordReceiver::Init(const DirectionKey& k, SysError& err) {
  plain_.resize(kRecordMax + kRecordOverhead);
  rec_.resize(kRecordMax + kRecordOverhead);
  return aead_.Init(k.key, k.salt, err);
}

bool RecordReceiver::Failed(SysError& err) {
  if (!failure_.failed()) return false;
  err = failure_;
  return true;
}

bool RecordReceiver::CheckLength(uint32_t len, SysError& err) {
  if (len > 0 && len <= kRecordMax) return true;
  err.fail("ERR_LIVEMIG_PROTOCOL", "an encrypted record of " + std::to_string(len) + " bytes (must be 1.." + std::to_string(kRecordMax) + ")");
  return false;
}

// Copies buffered plaintext into the front of iov[0..n), advancing both; returns the bytes.
size_t RecordReceiver::Serve(iovec*& iov, int& n, size_t want) {
  size_t given = 0;
  while (n > 0 && given < want && plainAt_ < plainEnd_) {
    size_t t = std::min({iov->iov_len, plainEnd_ - plainAt_, want - given});
    std::memcpy(iov->iov_base, plain_.data() + plainAt_, t);
    plainAt_ += t, given += t;
    iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + t;
    iov->iov_len -= t;
    if (iov->iov_len == 0) iov++, n--;
  }
  return given;
}

bool RecordReceiver::RecvAll(int fd, iovec* iov, int n, bool atFrameStart, SysError& err) {
  if (Failed(err)) return false;
  size_t left = TotalOf(iov, n);
  bool any = false;
  auto fail = [&]() {
    failure_ = err;
    return false;
  };
  while (left > 0) {
    if (plainAt_ < plainEnd_) {
      left -= Serve(iov, n, left);
      any = true;
      continue;
    }
    uint8_t h[kRecordHeadBytes];
    if (!RecvBytes(fd, h, kRecordHeadBytes, atFrameStart && !any, err)) return fail();
    any = true;
    const uint32_t len = Le32(h);
    if (!CheckLength(len, err)) return fail();
    uint8_t tag[kAeadTagBytes];
    if (len <= left) {
      // straight into what was asked for (the region's pages), opened there
      IovCursor cur{iov, n};
      cur.Take(len, sub_);
      size_t parts = sub_.size();
      sub_.push_back({tag, kAeadTagBytes});
      into_.assign(sub_.begin(), sub_.end());  // RecvAll advances what it is given
      if (!livemig::RecvAll(fd, into_.data(), static_cast<int>(into_.size()), false, err)) return fail();
      if (!aead_.OpenInPlace(h, kRecordHeadBytes, sub_.data(), static_cast<int>(parts), tag, err)) return fail();
      // advance iov past the len bytes just filled
      size_t skip = len;
      while (skip > 0) {
        size_t t = std::min(skip, iov->iov_len);
        iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + t;
        iov->iov_len -= t;
        skip -= t;
        if (iov->iov_len == 0) iov++, n--;
      }
      left -= len;
    } else {
      plain_.resize(len + kAeadTagBytes);
      if (!RecvBytes(fd, plain_.data(), len + kAeadTagBytes, false, err)) return fail();
      iovec v{plain_.data(), len};
      if (!aead_.OpenInPlace(h, kRecordHeadBytes, &v, 1, plain_.data() + len, err)) return fail();
      plainAt_ = 0, plainEnd_ = len;
    }
  }
  return true;
}

ssize_t RecordReceiver::RecvSome(int fd, iovec* iov, int n, SysError& err) {
  if (Failed(err)) return -1;
  while (plainAt_ == plainEnd_) {
    // assemble the next record: its length, then its ciphertext and tag
    size_t want = recGot_ < kRecordHeadBytes ? kRecordHeadBytes : kRecordHeadBytes + recLen_ + kAeadTagBytes;
    ssize_t got = recv(fd, rec_.data() + recGot_, want - recGot_, MSG_DONTWAIT);
    if (got < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
      err.set("recv", errno);
      failure_ = err;
      return -1;
    }
    if (got == 0) {
      err.fail("ERR_LIVEMIG_CONNECTION", "the peer closed the connection");
      failure_ = err;
      return -1;
    }
    recGot_ += static_cast<size_t>(got);
    if (recGot_ == kRecordHeadBytes) {
      recLen_ = Le32(rec_.data());
      if (!CheckLength(recLen_, err)) return failure_ = err, -1;
    } else if (recGot_ == want) {
      iovec v{rec_.data() + kRecordHeadBytes, recLen_};
      if (!aead_.OpenInPlace(rec_.data(), kRecordHeadBytes, &v, 1, rec_.data() + kRecordHeadBytes + recLen_, err)) return failure_ = err, -1;
      // the opened record becomes the buffer; the old buffer assembles the next record
      plain_.swap(rec_);
      plainAt_ = kRecordHeadBytes, plainEnd_ = kRecordHeadBytes + recLen_;
      rec_.resize(kRecordMax + kRecordOverhead);
      recGot_ = 0, recLen_ = 0;
    }
  }
  return static_cast<ssize_t>(Serve(iov, n, TotalOf(iov, n)));
}

bool RecordReceiver::FillNow(int fd, size_t maxLen, SysError& err) {
  if (Failed(err)) return false;
  if (plainAt_ < plainEnd_ || recGot_ > 0) return true;
  uint8_t h[kRecordHeadBytes];
  ssize_t got = recv(fd, h, kRecordHeadBytes, MSG_PEEK | MSG_DONTWAIT);
  if (got != static_cast<ssize_t>(kRecordHeadBytes)) return true;  // nothing whole yet; a blocking read reports errors
  const uint32_t len = Le32(h);
  if (len == 0 || len > maxLen) return true;
  int queued = 0;
  if (ioctl(fd, FIONREAD, &queued) != 0 || static_cast<size_t>(queued) < kRecordOverhead + len) return true;
  plain_.resize(kRecordOverhead + len);
  do got = recv(fd, plain_.data(), plain_.size(), MSG_DONTWAIT);
  while (got < 0 && errno == EINTR);
  if (got != static_cast<ssize_t>(plain_.size())) {
    // FIONREAD said it is all there and only this thread reads: short means broken
    err.set("recv", got < 0 ? errno : EPROTO, "a buffered record came short");
    failure_ = err;
    return false;
  }
  iovec v{plain_.data() + kRecordHeadBytes, len};
  if (!aead_.OpenInPlace(plain_.data(), kRecordHeadBytes, &v, 1, plain_.data() + kRecordHeadBytes + len, err)) return failure_ = err, false;
  plainAt_ = kRecordHeadBytes, plainEnd_ = kRecordHeadBytes + len;
  return true;
}

bool OpenStreamRecords(const DirectionKey& k, uint64_t first, const uint8_t* p, size_t len, std::vector<uint8_t>& plain, size_t& consumed, uint64_t& records,
                       SysError& err) {
  Aead aead;
  if (!aead.Init(k.key, k.salt, err)) return false;
  aead.StartAt(first);
  consumed = 0, records = 0;
  while (len - consumed >= kRecordHeadBytes) {
    const uint8_t* h = p + consumed;
    const uint32_t n = Le32(h);
    if (n == 0 || n > kRecordMax) {
      return err.fail("ERR_LIVEMIG_PROTOCOL", "an encrypted record of " + std::to_string(n) + " bytes (must be 1.." + std::to_string(kRecordMax) + ")"), false;
    }
    if (len - consumed < kRecordOverhead + n) break;
    const size_t at = plain.size();
    plain.insert(plain.end(), h + kRecordHeadBytes, h + kRecordHeadBytes + n);
    iovec v{plain.data() + at, n};
    if (!aead.OpenInPlace(h, kRecordHeadBytes, &v, 1, h + kRecordHeadBytes + n, err)) return false;
    consumed += kRecordOverhead + n, records++;
  }
  return true;
}

}  // namespace livemig
