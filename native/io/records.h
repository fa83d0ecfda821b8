// The encrypted stream's records (issue 17). Once TLS has authenticated both sides it steps
// aside, and every byte either way on the connection is inside a record:
//   u32 LE plaintext length (1..kRecordMax) | ciphertext | 16-byte GCM tag
// sealed with AES-256-GCM (io/aead.h) under the sending direction's key from the TLS exporter,
// the length bytes authenticated as additional data. The nonce is the direction's salt and the
// record's number, so a record dropped, repeated, reordered or altered fails authentication,
// and so does every record after it.
//
// Records are cut where the receiver reads: a frame's head (header, prefix, indices) is one
// record and its page bodies follow in records of up to kRecordMax, so that a receiver asked
// for page bodies takes their ciphertext straight into the region's pages and opens it there
// (the plaintext path's single kernel copy, plus the cipher). A record that is larger than
// what the reader asks for is opened into a buffer and served from it.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common.h"
#include "io/aead.h"

namespace livemig {

constexpr size_t kRecordMax = 256 * 1024;  // fits L2 here: sealed, sent, received and opened while hot
constexpr size_t kRecordHeadBytes = 4;
constexpr size_t kRecordOverhead = kRecordHeadBytes + kAeadTagBytes;

// Bytes that grow without being zero-filled: every byte of a record is written before it is
// read, and zeroing 256 KiB a record would cost a pass over the data.
class RawBytes {
 public:
  uint8_t* data() { return p_.get(); }
  const uint8_t* data() const { return p_.get(); }
  size_t size() const { return size_; }
  void resize(size_t n) {
    if (n > cap_) {
      std::unique_ptr<uint8_t[]> q(new uint8_t[n]);  // default-initialised: not zeroed
      if (size_) std::memcpy(q.get(), p_.get(), size_);
      p_ = std::move(q), cap_ = n;
    }
    size_ = n;
  }
  void swap(RawBytes& o) { std::swap(p_, o.p_), std::swap(size_, o.size_), std::swap(cap_, o.cap_); }

 private:
  std::unique_ptr<uint8_t[]> p_;
  size_t size_ = 0, cap_ = 0;
};

struct DirectionKey {
  uint8_t key[kAeadKeyBytes];
  uint8_t salt[kAeadSaltBytes];
};

// One direction's sealing side; used by one thread at a time (the Wire serialises writes).
class RecordSender {
 public:
  bool Init(const DirectionKey& k, SysError& err);
  // Seals iov[0..n) and sends it, blocking: the first `head` bytes as one record (when head is
  // nonzero and shorter than the whole), the rest in records of up to kRecordMax. Bytes an
  // earlier SendNow left waiting go first.
  bool Send(int fd, const iovec* iov, int n, size_t head, SysError& err);
  // Seals iov[0..n) and sends what the socket takes at once; the rest waits for the next Send
  // or Flush and `waiting` is set. False only when the connection is broken.
  bool SendNow(int fd, const iovec* iov, int n, bool& waiting, SysError& err);
  bool Flush(int fd, SysError& err);
  // Appends the record of [p, p + len) to out, for a caller that sends out itself (post-copy's
  // queued requests on a non-blocking socket).
  bool SealInto(const uint8_t* p, size_t len, std::vector<uint8_t>& out, SysError& err);

 private:
  // Appends one record of the `len` bytes of parts, or all the records of iov[0..n), to out
  // (a std::vector<uint8_t> or RawBytes).
  template <typename Out>
  bool SealOne(const std::vector<iovec>& parts, size_t len, Out& out, SysError& err);
  template <typename Out>
  bool SealRecords(const iovec* iov, int n, size_t head, Out& out, SysError& err);
  Aead aead_;
  RawBytes buf_;
  std::vector<uint8_t> waiting_;
  size_t waitingAt_ = 0;
  std::vector<iovec> sub_;
};

// One direction's opening side; used by one thread at a time. A failure (a record that fails
// authentication, a bad length, a broken connection) is kept: every later call fails with it,
// since the stream's position is lost.
class RecordReceiver {
 public:
  bool Init(const DirectionKey& k, SysError& err);
  // The peer's records before number `n` were opened elsewhere (OpenStreamRecords).
  void StartAt(uint64_t n) { aead_.StartAt(n); }
  // Blocking: fills iov[0..n) with plaintext.
  bool RecvAll(int fd, iovec* iov, int n, bool atFrameStart, SysError& err);
  // Non-blocking: plaintext into iov[0..n), as much as has arrived; returns the bytes given,
  // 0 when nothing can be given without waiting, -1 with err.
  ssize_t RecvSome(int fd, iovec* iov, int n, SysError& err);
  // Without waiting: when nothing is buffered and a whole record of at most `maxLen` bytes
  // waits in the socket, opens it into the buffer. False with err if it fails authentication.
  bool FillNow(int fd, size_t maxLen, SysError& err);
  size_t buffered() const { return plainEnd_ - plainAt_; }
  const uint8_t* bufferedData() const { return plain_.data() + plainAt_; }
  void Consume(size_t n) { plainAt_ += n; }

 private:
  bool Failed(SysError& err);
  bool CheckLength(uint32_t len, SysError& err);
  size_t Serve(iovec*& iov, int& n, size_t want);
  Aead aead_;
  RawBytes plain_, rec_;
  size_t plainAt_ = 0, plainEnd_ = 0;
  size_t recGot_ = 0;  // bytes of a record assembled by RecvSome
  uint32_t recLen_ = 0;
  std::vector<iovec> sub_, into_;
  SysError failure_;
};

// Opens the whole records at the front of [p, p + len) of one direction's stream, the first of
// them numbered `first`, appending their plaintext to `plain`; `consumed` and `records` say how
// far it got (a record not all there yet is left). False with err for a bad length (the
// stream's framing is lost) or a record that fails authentication.
bool OpenStreamRecords(const DirectionKey& k, uint64_t first, const uint8_t* p, size_t len, std::vector<uint8_t>& plain, size_t& consumed, uint64_t& records,
                       SysError& err);

}  // namespace livemig
