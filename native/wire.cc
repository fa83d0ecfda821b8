// The migration stream's data path. After the handshake a TCP connection's descriptor is
// handed to a Wire (a dup of it, switched to blocking mode) and every byte moves here, on
// thread-pool threads with no JavaScript inside:
//   - sendPages: PAGES frames written with sendmsg straight from the region (an iovec per run
//     of contiguous pages; the kernel's copy is the only one), each page hashed right after
//     it went, while it is still in cache;
//   - read: frames parsed as a state machine that waits for exactly the bytes it needs
//     (header, then prefix, then indices, then data); with a page sink, PAGES frames are
//     checked and received straight into the region and hashed, and the first other frame
//     is returned to JavaScript with its payload;
//   - write: control frames, gathered.
// One read and one write may run at once (TCP allows it); TypeScript serialises the rest.
// Validation messages match src/protocol (frame.ts decodeHeader, messages.ts decodePages).
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "encode.h"
#include "netio.h"
#include "pagehash.h"
#include "region.h"
#include "tracking.h"

namespace livemig {

namespace {

constexpr uint16_t kMagic = 0x4D4C;
constexpr size_t kHeaderBytes = 12;
constexpr uint8_t kTypePages = 4;
constexpr uint8_t kTypePagesEnc = 13;

// Frame header and the pages prefix (round, count) of a PAGES or PAGES_ENC frame.
inline void PutPagesHead(uint8_t* h, uint8_t version, uint8_t type, uint64_t payload, uint32_t round, uint32_t count) {
  h[0] = kMagic & 0xff;
  h[1] = kMagic >> 8;
  h[2] = version;
  h[3] = type;
  h[4] = h[5] = h[6] = h[7] = 0;
  Put32(h + 8, static_cast<uint32_t>(payload));
  Put32(h + 12, round);
  Put32(h + 16, count);
}
constexpr size_t kPrefixBytes = 8;
constexpr size_t kPageSize = 4096;

// Closes the descriptor when the Wire and every operation still using it are gone, so a
// thread blocked in recv never sees its descriptor number reused under it.
struct Fd {
  int fd;
  explicit Fd(int f) : fd(f) {}
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

}  // namespace

// Sends every byte of iov[0..n); advances through partial sends.
bool SendAll(int fd, iovec* iov, int n, SysError& err) {
  while (n > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min(n, kMaxIov);
    ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) continue;  // a signal arrived before any byte went: retry
      // EAGAIN here means SO_SNDTIMEO expired; EPIPE/ECONNRESET the peer went away
      err.set("sendmsg", errno);
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

namespace {

// Where to ask which pages were written since their protection was re-armed (the tracker's
// pagemap and the guest's address of the region), or fd -1.
struct WrittenProbe {
  int fd = -1;
  uint64_t address = 0;
};

struct SendCounts {
  double bytes = 0, zero = 0, dup = 0, skipped = 0, raw = 0, overheadMs = 0, indexMs = 0;
};

struct ReadResult {
  uint8_t version = 0, type = 0;
  uint16_t flags = 0;
  std::vector<uint8_t>* payload = nullptr;
  double pages = 0, batches = 0, bytes = 0;
  int64_t lastRound = -1;
};

struct Sink {
  Mapping* m = nullptr;
  uint64_t* hashes = nullptr;
  uint64_t pageCount = 0;
  uint8_t version = 0;
  uint32_t maxBatchPages = 0;
  FrameOrder* order = nullptr;  // set when encodings were negotiated
};

// Receives one PAGES payload (after its header) into the region. All indices are checked
// before a data byte is read, so a bad batch leaves the region as it was.
bool ReceivePages(int fd, const Sink& s, uint8_t version, uint32_t length, ReadResult& r, std::vector<uint32_t>& idx, std::vector<iovec>& iov, SysError& err) {
  if (version != s.version) {
    err.fail("ERR_LIVEMIG_VERSION", "frame of version " + std::to_string(version) + " after negotiating " + std::to_string(s.version));
    return false;
  }
  if (length < kPrefixBytes) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES payload of " + std::to_string(length) + " bytes is shorter than its prefix");
    return false;
  }
  uint8_t prefix[kPrefixBytes];
  if (!RecvBytes(fd, prefix, kPrefixBytes, false, err)) return false;
  uint32_t round = Le32(prefix), count = Le32(prefix + 4);
  if (count == 0 || count > s.maxBatchPages) {
    err.fail("ERR_LIVEMIG_PAGE_INDEX", "PAGES count " + std::to_string(count) + " is outside 1.." + std::to_string(s.maxBatchPages));
    return false;
  }
  uint64_t want = kPrefixBytes + static_cast<uint64_t>(count) * (4 + kPageSize);
  if (length != want) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES of " + std::to_string(count) + " pages must be " + std::to_string(want) + " bytes, got " + std::to_string(length));
    return false;
  }
  idx.resize(count);
  if (!RecvBytes(fd, idx.data(), count * 4ULL, false, err)) return false;
  for (uint32_t k = 0; k < count; k++) {
    idx[k] = Le32(reinterpret_cast<uint8_t*>(&idx[k]));
    if (idx[k] >= s.pageCount) {
      err.fail("ERR_LIVEMIG_PAGE_INDEX", "page index " + std::to_string(idx[k]) + " is outside the region's " + std::to_string(s.pageCount) + " pages");
      return false;
    }
  }
  iov.clear();
  PageIovecs(s.m->addr, idx.data(), count, iov);
  if (!RecvAll(fd, iov.data(), static_cast<int>(iov.size()), false, err)) return false;
  for (uint32_t k = 0; k < count; k++) {
    s.hashes[idx[k]] = PageHash(s.m->addr + static_cast<uint64_t>(idx[k]) * kPageSize, kPageSize);
  }
  r.pages += count;
  r.batches += 1;
  r.bytes += static_cast<double>(kHeaderBytes + length);
  r.lastRound = round;
  return true;
}

// Receives one PAGES_ENC payload: prefix, indices, encodings, then the bodies. Every index and
// encoding is checked before a body byte is read. Without lz4 pages the body layout is known
// from the encodings, so its size is checked too and raw bodies land straight in the region's
// pages (dup hashes in a side buffer); with lz4 pages the body is read whole and decoded. Then
// pages are applied in order with the dedup index updated as the sender updated it. A
// malformed page fails the migration (the region is discarded then).
bool ReceiveEncoded(int fd, const Sink& s, uint8_t version, uint32_t length, ReadResult& r, std::vector<uint32_t>& idx, std::vector<uint8_t>& body, SysError& err) {
  if (!s.order) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC without negotiated encodings");
    return false;
  }
  if (version != s.version) {
    err.fail("ERR_LIVEMIG_VERSION", "frame of version " + std::to_string(version) + " after negotiating " + std::to_string(s.version));
    return false;
  }
  if (length < kPrefixBytes) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC payload of " + std::to_string(length) + " bytes is shorter than its prefix");
    return false;
  }
  uint8_t prefix[kPrefixBytes];
  if (!RecvBytes(fd, prefix, kPrefixBytes, false, err)) return false;
  uint32_t round = Le32(prefix), count = Le32(prefix + 4);
  if (count == 0 || count > s.maxBatchPages) {
    err.fail("ERR_LIVEMIG_PAGE_INDEX", "PAGES_ENC count " + std::to_string(count) + " is outside 1.." + std::to_string(s.maxBatchPages));
    return false;
  }
  uint64_t head = kPrefixBytes + static_cast<uint64_t>(count) * 5;
  if (length < head) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC of " + std::to_string(count) + " pages is shorter than its index and encodings");
    return false;
  }
  idx.resize(count);
  std::vector<uint8_t> enc(count);
  if (!RecvBytes(fd, idx.data(), count * 4ULL, false, err) || !RecvBytes(fd, enc.data(), count, false, err)) return false;
  bool anyLz4 = false;
  uint64_t fixedBody = 0;  // body size when there is no lz4 page
  for (uint32_t k = 0; k < count; k++) {
    idx[k] = Le32(reinterpret_cast<uint8_t*>(&idx[k]));
    if (idx[k] >= s.pageCount) {
      err.fail("ERR_LIVEMIG_PAGE_INDEX", "page index " + std::to_string(idx[k]) + " is outside the region's " + std::to_string(s.pageCount) + " pages");
      return false;
    }
    if (!IsWireEncoding(enc[k])) {
      err.fail("ERR_LIVEMIG_PROTOCOL", "unknown page encoding " + std::to_string(enc[k]));
      return false;
    }
    if (enc[k] == kLz4Cont) {
      // a continuation follows an lz4 page or another continuation, at most a group's length
      uint32_t g = 1;
      while (g <= k && enc[k - g] == kLz4Cont) g++;
      if (g > k || enc[k - g] != kLz4 || g >= kMaxLz4Group) {
        err.fail("ERR_LIVEMIG_PROTOCOL", "lz4 continuation page " + std::to_string(idx[k]) + " without an lz4 block of at most " + std::to_string(kMaxLz4Group) + " pages before it");
        return false;
      }
    }
    anyLz4 |= enc[k] == kLz4;
    fixedBody += enc[k] == kRaw ? kPageSize : enc[k] == kDup ? kDupBody : 0;
  }
  if (!s.order->Begin(idx.data(), count, s.pageCount)) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC lists a page twice");
    return false;
  }
  const bool direct = !anyLz4;
  std::vector<iovec> iov;
  if (direct) {
    if (fixedBody != length - head) {
      err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC bodies of " + std::to_string(count) + " pages must be " + std::to_string(fixedBody) + " bytes, got " + std::to_string(length - head));
      return false;
    }
    body.resize(count * uint64_t{kDupBody});  // dup bodies, at kDupBody*k
    for (uint32_t k = 0; k < count; k++) {
      if (enc[k] == kDup) {
        iov.push_back({body.data() + uint64_t{kDupBody} * k, kDupBody});
      } else if (enc[k] != kZero) {
        uint8_t* p = s.m->addr + static_cast<uint64_t>(idx[k]) * kPageSize;
        bool extends = !iov.empty() && iov.back().iov_len % kPageSize == 0 && static_cast<uint8_t*>(iov.back().iov_base) + iov.back().iov_len == p;
        if (extends) iov.back().iov_len += kPageSize;
        else iov.push_back({p, kPageSize});
      }
    }
    if (!iov.empty() && !RecvAll(fd, iov.data(), static_cast<int>(iov.size()), false, err)) return false;
  } else {
    body.resize(length - head);
    if (!RecvBytes(fd, body.data(), body.size(), false, err)) return false;
  }
  const uint64_t zh = ZeroPageHash(kPageSize);
  size_t pos = 0;
  std::vector<uint8_t> lz4Scratch;
  auto need = [&](size_t n) {
    if (body.size() - pos >= n) return true;
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC body ends in the middle of a page");
    return false;
  };
  for (uint32_t k = 0; k < count; k++) {
    uint32_t x = idx[k];
    uint8_t* dst = s.m->addr + static_cast<uint64_t>(x) * kPageSize;
    uint64_t h;
    switch (enc[k]) {
      case kRaw:
        if (!direct) {
          if (!need(kPageSize)) return false;
          std::memcpy(dst, body.data() + pos, kPageSize);
          pos += kPageSize;
        }
        h = PageHash(dst, kPageSize);
        break;
      case kZero:
        std::memset(dst, 0, kPageSize);
        h = zh;
        break;
      case kDup: {
        // u64 content hash, u32 page holding it: checked against what this side holds there
        const uint8_t* d;
        if (direct) {
          d = body.data() + uint64_t{kDupBody} * k;
        } else {
          if (!need(kDupBody)) return false;
          d = body.data() + pos;
          pos += kDupBody;
        }
        uint64_t ref;
        std::memcpy(&ref, d, 8);
        uint32_t y = Le32(d + 8);
        char hex[24];
        snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(ref));
        if (y >= s.pageCount || s.hashes[y] != ref) {
          err.fail("ERR_LIVEMIG_PROTOCOL", std::string("dup reference to content ") + hex + " in page " + std::to_string(y) + ", which this receiver does not hold there");
          return false;
        }
        if (s.order->WrittenAfter(y, k)) {
          err.fail("ERR_LIVEMIG_PROTOCOL", std::string("dup reference to content ") + hex + " in page " + std::to_string(y) + ", which this frame writes later");
          return false;
        }
        if (y != x) std::memcpy(dst, s.m->addr + static_cast<uint64_t>(y) * kPageSize, kPageSize);
        h = ref;
        break;
      }
      case kLz4Cont:  // (checked above to follow its block; consumed by it)
        err.fail("ERR_LIVEMIG_PROTOCOL", "lz4 continuation page " + std::to_string(x) + " outside its block");
        return false;
      default: {  // kLz4: u32 n, then n bytes: u32 original size + LZ4 block of g pages
        uint32_t g = 1;
        while (k + g < count && enc[k + g] == kLz4Cont) g++;
        const uint64_t want = uint64_t{g} * kPageSize;
        if (!need(4)) return false;
        uint32_t n = Le32(body.data() + pos);
        pos += 4;
        if (n < 4 || n > want || !need(n)) {
          if (!err.failed()) err.fail("ERR_LIVEMIG_PROTOCOL", "lz4 block of " + std::to_string(n) + " bytes for " + std::to_string(g) + " page(s) (must be 4.." + std::to_string(want) + ")");
          return false;
        }
        uint32_t original = Le32(body.data() + pos);
        if (original != want) {
          err.fail("ERR_LIVEMIG_PROTOCOL", "lz4 block decompresses to " + std::to_string(original) + " bytes, not " + std::to_string(g) + " page(s) of " + std::to_string(kPageSize));
          return false;
        }
        // one page decodes in place; a group into scratch, then to each of its pages
        uint8_t* out = dst;
        if (g > 1) {
          lz4Scratch.resize(want);
          out = lz4Scratch.data();
        }
        if (!Lz4DecodeBlock(body.data() + pos + 4, n - 4, out, want)) {
          err.fail("ERR_LIVEMIG_PROTOCOL", "corrupt lz4 page " + std::to_string(x));
          return false;
        }
        pos += n;
        for (uint32_t j = 1; j < g; j++) {
          uint8_t* pj = s.m->addr + static_cast<uint64_t>(idx[k + j]) * kPageSize;
          std::memcpy(pj, out + uint64_t{j} * kPageSize, kPageSize);
          s.hashes[idx[k + j]] = PageHash(pj, kPageSize);
        }
        if (g > 1) std::memcpy(dst, out, kPageSize);
        h = PageHash(dst, kPageSize);
        k += g - 1;  // the continuations are applied
      }
    }
    s.hashes[x] = h;
  }
  if (!direct && pos != body.size()) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC body has " + std::to_string(body.size() - pos) + " bytes after its last page");
    return false;
  }
  r.pages += count;
  r.batches += 1;
  r.bytes += static_cast<double>(kHeaderBytes + length);
  r.lastRound = round;
  return true;
}

class Wire : public Napi::ObjectWrap<Wire> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "Wire",
                       {InstanceMethod("write", &Wire::Write), InstanceMethod("sendPages", &Wire::SendPages),
                        InstanceMethod("read", &Wire::Read), InstanceMethod("shutdown", &Wire::Shutdown),
                        InstanceMethod("close", &Wire::Close), InstanceMethod("setTimeouts", &Wire::SetTimeouts),
                        InstanceMethod("finish", &Wire::Finish), InstanceMethod("sendEncoded", &Wire::SendEncoded),
                        InstanceMethod("fd", &Wire::GetFd), InstanceMethod("forget", &Wire::Forget),
                        InstanceMethod("writeNow", &Wire::WriteNow), InstanceMethod("readNow", &Wire::ReadNow)});
  }

  // new Wire(fd): takes a duplicate of a connected TCP socket's descriptor; the caller closes
  // its own. The duplicate is made blocking: the threads that use it wait in the kernel.
  explicit Wire(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Wire>(info) {
    Napi::Env env = info.Env();
    int fd = fcntl(info[0].As<Napi::Number>().Int32Value(), F_DUPFD_CLOEXEC, 3);
    if (fd < 0) throw MakeSysError(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
    fd_ = std::make_shared<Fd>(fd);
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) throw MakeSysError(env, "fcntl(F_SETFL)", errno);
    int one = 1;
    // Frames are written whole; TCP_NODELAY keeps a lone control frame from waiting 40 ms
    // for an ACK. ENOTSUP (not TCP, e.g. a socketpair in tests) is harmless.
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 && errno != EOPNOTSUPP && errno != ENOPROTOOPT) {
      throw MakeSysError(env, "setsockopt(TCP_NODELAY)", errno);
    }
  }

 private:
  std::shared_ptr<Fd> Live(Napi::Env env) {
    if (!fd_) throw Napi::Error::New(env, "the wire is closed");
    return fd_;
  }

  // write(buffers: Buffer[]) -> Promise<void>
  Napi::Value Write(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Array arr = info[0].As<Napi::Array>();
    std::vector<iovec> iov;
    std::vector<Napi::Value> keep{info[0]};
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Buffer<uint8_t> b = arr.Get(i).As<Napi::Buffer<uint8_t>>();
      if (b.Length() > 0) iov.push_back({b.Data(), b.Length()});
    }
    return Task<int>::Start(
        env,
        [fd, iov](int&, SysError& err) mutable { SendAll(fd->fd, iov.data(), static_cast<int>(iov.size()), err); },
        [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); }, keep);
  }

  // writeNow(parts: Buffer[]) -> bytes the kernel took at once, on the calling thread, without
  // waiting (0 when the socket buffer is full). For small control frames inside a pause, where
  // a hop through the thread pool and back costs more than the send; the caller queues the
  // rest, if any, behind it.
  Napi::Value WriteNow(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Array arr = info[0].As<Napi::Array>();
    std::vector<iovec> iov;
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Buffer<uint8_t> b = arr.Get(i).As<Napi::Buffer<uint8_t>>();
      if (b.Length() > 0) iov.push_back({b.Data(), b.Length()});
    }
    if (iov.empty()) return Napi::Number::New(env, 0);
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = std::min(static_cast<int>(iov.size()), kMaxIov);
    for (;;) {
      ssize_t n = sendmsg(fd->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n >= 0) return Napi::Number::New(env, static_cast<double>(n));
      if (errno == EINTR) continue;                             // interrupted before any byte: again
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, 0);  // full: queue it
      throw MakeSysError(env, "sendmsg", errno);                // EPIPE, ECONNRESET: the connection is gone
    }
  }

  // sendPages(region, pages: Uint32Array, round, version, batchPages, hashes, dedup?, flags?)
  //   -> Promise<{bytes, zero, dup, skipped, raw, overheadMs, indexMs}>
  // Sends `pages` in frames of up to batchPages, straight from the region, and stores each
  // page's hash in hashes[page]. Without flags: PAGES frames, each page hashed in place right
  // after it went. With flags (1 zero, 2 dedup; needs the dedup index): PAGES_ENC frames where,
  // in place and without a copy, an all-zero page is `zero`, a page whose content the sender
  // knows the receiver holds elsewhere is `dup`, one the receiver already holds there is left
  // out, and the rest go raw from the region (a batch with nothing saved goes as PAGES). With a
  // probe, raw pages the tracker shows unwritten since before their hash become dup sources.
  // A page the guest changes meanwhile may go out torn, or as a dup of its old content; the
  // tracker reports it dirty (write protection was re-armed before this read), so a later
  // round resends and rehashes it.
  Napi::Value SendPages(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
    if (!m) return env.Undefined();
    Napi::Uint32Array pages = info[1].As<Napi::Uint32Array>();
    uint32_t round = info[2].As<Napi::Number>().Uint32Value();
    uint8_t version = static_cast<uint8_t>(info[3].As<Napi::Number>().Uint32Value());
    uint32_t batchPages = info[4].As<Napi::Number>().Uint32Value();
    Napi::BigUint64Array hashes = info[5].As<Napi::BigUint64Array>();
    uint64_t pageCount = m->size / kPageSize;
    if (batchPages == 0) throw Napi::RangeError::New(env, "batchPages must be positive");
    if (hashes.ElementLength() < pageCount) throw Napi::RangeError::New(env, "hash table smaller than the region");
    const uint32_t* idx = pages.Data();
    size_t count = pages.ElementLength();
    for (size_t k = 0; k < count; k++) {
      if (idx[k] >= pageCount) throw Napi::RangeError::New(env, "page index outside the region");
    }
    uint64_t* table = hashes.Data();
    DedupState* dedup = info[6].IsObject() ? &Dedup::Unwrap(info[6])->state : nullptr;
    if (dedup && dedup->holder.size() != pageCount) throw Napi::RangeError::New(env, "dedup index does not match the region");
    uint32_t flags = info[7].IsNumber() ? info[7].As<Napi::Number>().Uint32Value() : 0;
    if (flags && !dedup) throw Napi::TypeError::New(env, "encoded frames need the dedup index");
    WrittenProbe probe;
    if (info[8].IsObject()) {
      Napi::Object po = info[8].As<Napi::Object>();
      probe.fd = po.Get("pagemapFd").As<Napi::Number>().Int32Value();
      bool lossless = false;
      probe.address = po.Get("address").As<Napi::BigInt>().Uint64Value(&lossless);
    }
    m->Ref();
    std::vector<Napi::Value> keep{info[0], info[1], info[5]};
    if (dedup) keep.push_back(info[6]);
    // now: on the calling thread (a few pages inside the pause; see Task::RunNow)
    bool now = info.Length() > 9 && info[9].ToBoolean().Value();
    auto work = [fd, m, idx, count, round, version, batchPages, table, dedup, flags, pageCount, probe](SendCounts& c, SysError& err) {
      std::vector<uint8_t> head;
      std::vector<iovec> iov;
      std::vector<uint8_t> enc;
      std::vector<uint64_t> refs;
      std::vector<uint8_t> dupBodies;
      std::vector<uint32_t> written;
      std::vector<uint8_t> dirtyMark, hashedEarly, wantIndex;
      const bool zeroOn = flags & 1, dedupOn = flags & 2;
      const uint64_t zh = ZeroPageHash(kPageSize);
      // time spent on encoding work (classifying before the send, indexing after it), so the
      // chooser can weigh it against the bytes it saved
      auto nowNs = [] { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; };
      long long t0 = nowNs(), overhead = 0;
      for (size_t start = 0; start < count && !err.failed(); start += batchPages) {
        size_t n = std::min<size_t>(batchPages, count - start);
        const uint32_t* b = idx + start;
        t0 = nowNs();
        iov.clear();
        uint64_t payload;
        uint8_t type;
        size_t kept = n;
        // a PAGES frame of the whole batch: indices in the head, bodies straight from the region
        auto plainFrame = [&] {
          type = kTypePages;
          payload = kPrefixBytes + n * (4 + kPageSize);
          head.resize(kHeaderBytes + kPrefixBytes + n * 4);
          for (size_t k = 0; k < n; k++) Put32(head.data() + 20 + 4 * k, b[k]);
          iov.push_back({head.data(), head.size()});
          PageIovecs(m->addr, b, n, iov);
          c.raw += static_cast<double>(n);
            };
        if (!flags) {
          plainFrame();
        } else {
          type = kTypePagesEnc;
          enc.resize(n);
          refs.resize(n);
          dupBodies.resize(n * kDupBody);
          hashedEarly.resize(n);
          wantIndex.resize(n);
          dedup->order.Begin(b, n, pageCount);
          kept = 0;
          for (size_t k = 0; k < n; k++) {
            uint32_t x = b[k];
            const uint8_t* live = m->addr + static_cast<uint64_t>(x) * kPageSize;
            // the zero check's first load misses the cache; start the next pages' loads now
            if (k + 8 < n) __builtin_prefetch(m->addr + static_cast<uint64_t>(b[k + 8]) * kPageSize);
            bool zero = zeroOn && IsZeroPage(live, kPageSize);
            // Hash before sending only where it can pay: the page may still be what the
            // receiver holds there, or its fingerprint matches indexed content. Otherwise it
            // is hashed after the send, while still in cache.
            bool early = zero || (dedupOn && ((dedup->known[x] && dedup->holder[x] != zh) || dedup->MayHold(live)));
            uint64_t h = zero ? zh : early ? PageHash(live, kPageSize) : 0;
            hashedEarly[k] = early;
            if (early) {
              table[x] = h;
              uint32_t source = 0;
              enc[k] = dedup->Choose(x, k, h, zero, zeroOn, dedupOn, false, &source);
              if (enc[k] == kDup) {
                std::memcpy(&dupBodies[k * kDupBody], &h, 8);
                Put32(&dupBodies[k * kDupBody + 8], source);
              }
            } else {
              enc[k] = kRaw;
              dedup->Invalidate(x);
            }
            // index a raw page after the send if it may be a dup source: early-hashed pages,
            // and others whose content was seen before (not every unique page)
            wantIndex[k] = dedupOn && enc[k] == kRaw && (early || dedup->SeenBefore(live));
            refs[k] = h;
            if (enc[k] != kSkip) kept++;
          }
          size_t raws = 0;
          for (size_t k = 0; k < n; k++) raws += enc[k] == kRaw;
          if (raws == n) {
            // nothing saved in this batch: a plain PAGES frame says the same and its
            // receiver has less to do (no encodings to parse, one header per frame)
            plainFrame();
          } else {
          head.resize(kHeaderBytes + kPrefixBytes + kept * 5);
          iov.push_back({head.data(), head.size()});
          payload = kPrefixBytes + kept * 5;
          size_t j = 0;
          bool lastWasPage = false;  // consecutive raw pages share one iovec
          for (size_t k = 0; k < n; k++) {
            uint8_t e = enc[k];
            if (e == kSkip) {
              c.skipped++;
              continue;
            }
            Put32(head.data() + 20 + 4 * j, b[k]);
            head[20 + 4 * kept + j] = e;
            j++;
            if (e == kRaw) {
              uint8_t* p = m->addr + static_cast<uint64_t>(b[k]) * kPageSize;
              if (lastWasPage && static_cast<uint8_t*>(iov.back().iov_base) + iov.back().iov_len == p) iov.back().iov_len += kPageSize;
              else iov.push_back({p, kPageSize});
              lastWasPage = true;
              payload += kPageSize;
              c.raw++;
              continue;
            }
            lastWasPage = false;
            if (e == kDup) {
              iov.push_back({&dupBodies[k * kDupBody], kDupBody});
              payload += kDupBody;
              c.dup++;
            } else {
              c.zero++;
            }
          }
          }
        }
        if (kept == 0) continue;
        if (flags) overhead += nowNs() - t0;
        PutPagesHead(head.data(), version, type, payload, round, static_cast<uint32_t>(kept));
        if (!SendAll(fd->fd, iov.data(), static_cast<int>(iov.size()), err)) break;
        c.bytes += static_cast<double>(kHeaderBytes + payload);
        if (!flags) {
          for (size_t k = 0; k < n; k++) {
            table[b[k]] = PageHash(m->addr + static_cast<uint64_t>(b[k]) * kPageSize, kPageSize);
            if (dedup) dedup->Invalidate(b[k]);  // hashed live, after the send: not known to match
          }
        } else {
          for (size_t k = 0; k < n; k++)
            if (enc[k] == kRaw && !hashedEarly[k]) refs[k] = table[b[k]] = PageHash(m->addr + static_cast<uint64_t>(b[k]) * kPageSize, kPageSize);
          bool anyIndex = false;
          for (size_t k = 0; k < n && !anyIndex; k++) anyIndex = wantIndex[k];
          if (dedupOn && probe.fd >= 0 && anyIndex) {
            long long tIndex = nowNs();
            // A raw page not written since its protection was re-armed (before this send
            // and both hashes) went out as exactly the hashed bytes: the receiver now holds
            // it under that hash, so it may serve as a dup source from now on.
            uint32_t lo = b[0], hi = b[0];
            for (size_t k = 1; k < n; k++) lo = std::min(lo, b[k]), hi = std::max(hi, b[k]);
            written.clear();
            SysError scanErr;
            ScanWritten(probe.fd, probe.address + uint64_t{lo} * kPageSize, probe.address + (uint64_t{hi} + 1) * kPageSize, kPageSize, false, &written, &scanErr);
            if (!scanErr.failed()) {  // if the scan fails, the pages just stay out of the index
              dirtyMark.assign(hi - lo + 1, 0);
              for (uint32_t w : written) dirtyMark[w] = 1;
              for (size_t k = 0; k < n; k++) {
                if (k + 8 < n && wantIndex[k + 8]) dedup->head.Prefetch(refs[k + 8]);
                if (!wantIndex[k] || dirtyMark[b[k] - lo]) continue;
                const uint8_t* p = m->addr + static_cast<uint64_t>(b[k]) * kPageSize;
                dedup->Set(b[k], refs[k]);
                dedup->NoteFingerprint(b[k], p);
              }
            }
            overhead += nowNs() - tIndex;
            c.indexMs += static_cast<double>(nowNs() - tIndex) / 1e6;
          }
        }
      }
      c.overheadMs = static_cast<double>(overhead) / 1e6;
      m->Unref();
    };
    auto done = [](Napi::Env e, SendCounts& c) -> Napi::Value {
      Napi::Object o = Napi::Object::New(e);
      o.Set("bytes", c.bytes);
      o.Set("zero", c.zero);
      o.Set("dup", c.dup);
      o.Set("skipped", c.skipped);
      o.Set("raw", c.raw);
      o.Set("overheadMs", c.overheadMs);
      o.Set("indexMs", c.indexMs);
      return o;
    };
    return now ? Task<SendCounts>::RunNow(env, work, done) : Task<SendCounts>::Start(env, work, done, keep);
  }

  // sendEncoded(pages, enc: Uint8Array, staging: Buffer, lz4: Buffer, lengths: Int32Array,
  //             hashes, round, version) -> Promise<number>
  // One PAGES_ENC frame for a classified batch: skipped pages are left out; raw bodies come
  // from staging[k*pageSize], lz4 bodies from lz4[k*pageSize] (lengths[k] bytes), dup bodies
  // are the page's content hash and the source page lengths[k]. Resolves to the bytes written (0 if every page was skipped).
  Napi::Value SendEncoded(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Uint32Array pages = info[0].As<Napi::Uint32Array>();
    Napi::Uint8Array enc = info[1].As<Napi::Uint8Array>();
    Napi::Buffer<uint8_t> staging = info[2].As<Napi::Buffer<uint8_t>>();
    Napi::Buffer<uint8_t> lz4 = info[3].As<Napi::Buffer<uint8_t>>();
    Napi::Int32Array lens = info[4].As<Napi::Int32Array>();
    Napi::BigUint64Array hashes = info[5].As<Napi::BigUint64Array>();
    uint32_t round = info[6].As<Napi::Number>().Uint32Value();
    uint8_t version = static_cast<uint8_t>(info[7].As<Napi::Number>().Uint32Value());
    size_t n = pages.ElementLength();
    if (enc.ElementLength() != n || staging.Length() < n * kPageSize || lz4.Length() < n * kPageSize || lens.ElementLength() < n) throw Napi::RangeError::New(env, "sendEncoded buffers do not match the batch");
    const uint32_t* idx = pages.Data();
    for (size_t k = 0; k < n; k++) {
      if (idx[k] >= hashes.ElementLength()) throw Napi::RangeError::New(env, "page index outside the hash table");
      if (enc.Data()[k] == kLz4) {
        size_t g = 1;
        while (k + g < n && enc.Data()[k + g] == kLz4Cont) g++;
        if (g > kMaxLz4Group || lens.Data()[k] < 4 || static_cast<size_t>(lens.Data()[k]) > g * kPageSize) throw Napi::RangeError::New(env, "lz4 length out of range");
      }
      if (enc.Data()[k] == kLz4Cont && (k == 0 || (enc.Data()[k - 1] != kLz4 && enc.Data()[k - 1] != kLz4Cont))) throw Napi::RangeError::New(env, "lz4 continuation without its block");
      if (enc.Data()[k] == kDup && (lens.Data()[k] < 0 || static_cast<size_t>(lens.Data()[k]) >= hashes.ElementLength())) throw Napi::RangeError::New(env, "dup source page out of range");
    }
    const uint8_t* e = enc.Data();
    const uint8_t* stage = staging.Data();
    const uint8_t* out = lz4.Data();
    const int32_t* len = lens.Data();
    const uint64_t* table = hashes.Data();
    return Task<double>::Start(
        env,
        [fd, idx, e, stage, out, len, table, n, round, version](double& bytes, SysError& err) {
          std::vector<uint32_t> keep;
          for (size_t k = 0; k < n; k++)
            if (e[k] != kSkip) keep.push_back(static_cast<uint32_t>(k));
          if (keep.empty()) return;
          size_t c = keep.size();
          std::vector<uint8_t> head(kHeaderBytes + kPrefixBytes + c * 5);
          std::vector<uint8_t> small(c * 16);  // dup bodies and lz4 lengths
          std::vector<iovec> iov;
          iov.push_back({head.data(), head.size()});
          uint64_t payload = kPrefixBytes + c * 5;
          uint8_t* h = head.data();
          for (size_t j = 0; j < c; j++) {
            size_t k = keep[j];
            Put32(h + 20 + 4 * j, idx[k]);
            h[20 + 4 * c + j] = e[k] == kIncompressible ? static_cast<uint8_t>(kRaw) : e[k];
            uint8_t* sm = small.data() + 16 * j;
            switch (e[k]) {
              case kIncompressible:
              case kRaw:
                iov.push_back({const_cast<uint8_t*>(stage + k * kPageSize), kPageSize});
                payload += kPageSize;
                break;
              case kDup:  // lengths[k] holds the source page for a dup
                std::memcpy(sm, &table[idx[k]], 8);
                Put32(sm + 8, static_cast<uint32_t>(len[k]));
                iov.push_back({sm, kDupBody});
                payload += kDupBody;
                break;
              case kLz4:
                Put32(sm, static_cast<uint32_t>(len[k]));
                iov.push_back({sm, 4});
                iov.push_back({const_cast<uint8_t*>(out + k * kPageSize), static_cast<size_t>(len[k])});
                payload += 4 + len[k];
                break;
              default:
                break;  // kZero: no body
            }
          }
          PutPagesHead(h, version, kTypePagesEnc, payload, round, static_cast<uint32_t>(c));
          if (SendAll(fd->fd, iov.data(), static_cast<int>(iov.size()), err)) bytes = static_cast<double>(kHeaderBytes + payload);
        },
        [](Napi::Env env2, double& bytes) -> Napi::Value { return Napi::Number::New(env2, bytes); },
        {info[0], info[1], info[2], info[3], info[4], info[5]});
  }

  // read({maxPayload, maxType, sink?: {region, hashes, version, maxBatchPages}}) -> Promise<{
  //   version, type, flags, payload: Buffer, pages, batches, bytes, lastRound }>
  // Without a sink, returns the next frame. With one, receives PAGES frames into the region
  // until another frame arrives, and returns that one with counts of what was applied.
  Napi::Value Read(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Object o = info[0].As<Napi::Object>();
    uint32_t maxPayload = o.Get("maxPayload").As<Napi::Number>().Uint32Value();
    uint32_t maxType = o.Get("maxType").As<Napi::Number>().Uint32Value();
    Sink sink;
    std::vector<Napi::Value> keep{o};
    Napi::Value sv = o.Get("sink");
    if (sv.IsObject()) {
      Napi::Object so = sv.As<Napi::Object>();
      sink.m = Region::Unwrap(so.Get("region"))->LiveMapping(env);
      if (!sink.m) return env.Undefined();
      Napi::BigUint64Array hashes = so.Get("hashes").As<Napi::BigUint64Array>();
      sink.pageCount = sink.m->size / kPageSize;
      if (hashes.ElementLength() < sink.pageCount) throw Napi::RangeError::New(env, "hash table smaller than the region");
      sink.hashes = hashes.Data();
      sink.version = static_cast<uint8_t>(so.Get("version").As<Napi::Number>().Uint32Value());
      sink.maxBatchPages = so.Get("maxBatchPages").As<Napi::Number>().Uint32Value();
      if (so.Get("encodings").ToBoolean()) sink.order = order_.get();
      sink.m->Ref();
    }
    auto order = order_;
    return Task<ReadResult>::Start(
        env,
        [fd, maxPayload, maxType, sink, order](ReadResult& r, SysError& err) {
          std::vector<uint32_t> idx;
          std::vector<iovec> iov;
          std::vector<uint8_t> body;
          for (;;) {
            uint8_t h[kHeaderBytes];
            if (!RecvBytes(fd->fd, h, kHeaderBytes, true, err)) break;
            uint16_t magic = Le16(h);
            uint8_t version = h[2], type = h[3];
            uint16_t flags = Le16(h + 4), reserved = Le16(h + 6);
            uint32_t length = Le32(h + 8);
            char hex[16];
            if (magic != kMagic) {
              snprintf(hex, sizeof hex, "%x", magic);
              err.fail("ERR_LIVEMIG_PROTOCOL", std::string("bad frame magic 0x") + hex + " (expected 0x4d4c): not a livemig stream");
              break;
            }
            if (type == 0 || type > maxType) {
              err.fail("ERR_LIVEMIG_PROTOCOL", "unknown frame type " + std::to_string(type));
              break;
            }
            if (reserved != 0) {
              err.fail("ERR_LIVEMIG_PROTOCOL", "reserved header field is " + std::to_string(reserved) + ", not 0");
              break;
            }
            if (length > maxPayload) {
              err.fail("ERR_LIVEMIG_FRAME_TOO_LARGE", "frame of type " + std::to_string(type) + " announces " + std::to_string(length) + " payload bytes (max " + std::to_string(maxPayload) + ")");
              break;
            }
            if (type == kTypePages && sink.m) {
              if (!ReceivePages(fd->fd, sink, version, length, r, idx, iov, err)) break;
              continue;
            }
            if (type == kTypePagesEnc && sink.m) {
              if (!ReceiveEncoded(fd->fd, sink, version, length, r, idx, body, err)) break;
              continue;
            }
            r.version = version;
            r.type = type;
            r.flags = flags;
            r.payload = new std::vector<uint8_t>(length);
            if (!RecvBytes(fd->fd, r.payload->data(), length, false, err)) break;
            break;
          }
          if (err.failed() && r.payload) {
            delete r.payload;
            r.payload = nullptr;
          }
          if (sink.m) sink.m->Unref();
        },
        [](Napi::Env e, ReadResult& r) -> Napi::Value {
          Napi::Object out = Napi::Object::New(e);
          out.Set("version", r.version);
          out.Set("type", r.type);
          out.Set("flags", r.flags);
          std::vector<uint8_t>* p = r.payload;
          r.payload = nullptr;
          out.Set("payload", p->empty() ? (delete p, Napi::Buffer<uint8_t>::New(e, 0))
                                        : Napi::Buffer<uint8_t>::New(e, p->data(), p->size(), [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; }, p));
          out.Set("pages", r.pages);
          out.Set("batches", r.batches);
          out.Set("bytes", r.bytes);
          out.Set("lastRound", static_cast<double>(r.lastRound));
          return out;
        },
        keep);
  }

  // readNow({maxPayload, maxType}) -> a frame, or null: a whole control frame (not pages, at
  // most 64 KiB) that is already in the socket buffer, read on the calling thread. Anything
  // else (not all there yet, pages, a header read() would refuse) returns null and is left
  // for read(), which waits, applies pages and reports errors. Inside a pause, a frame that
  // has arrived needs no hop through the thread pool.
  Napi::Value ReadNow(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Object o = info[0].As<Napi::Object>();
    uint32_t maxPayload = std::min<uint32_t>(o.Get("maxPayload").As<Napi::Number>().Uint32Value(), 64 * 1024);
    uint32_t maxType = o.Get("maxType").As<Napi::Number>().Uint32Value();
    uint8_t h[kHeaderBytes];
    ssize_t n = recv(fd->fd, h, kHeaderBytes, MSG_PEEK | MSG_DONTWAIT);
    if (n != static_cast<ssize_t>(kHeaderBytes)) return env.Null();  // EAGAIN, EOF, an error, or a partial header
    uint8_t version = h[2], type = h[3];
    uint32_t length = Le32(h + 8);
    if (Le16(h) != kMagic || type == 0 || type > maxType || Le16(h + 6) != 0 || length > maxPayload) return env.Null();
    if (type == kTypePages || type == kTypePagesEnc) return env.Null();
    int queued = 0;
    if (ioctl(fd->fd, FIONREAD, &queued) != 0 || static_cast<uint64_t>(queued) < kHeaderBytes + static_cast<uint64_t>(length)) return env.Null();
    Napi::Buffer<uint8_t> payload = Napi::Buffer<uint8_t>::New(env, length);
    iovec iov[2] = {{h, kHeaderBytes}, {payload.Data(), length}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = length ? 2 : 1;
    ssize_t got;
    do got = recvmsg(fd->fd, &msg, MSG_DONTWAIT);
    while (got < 0 && errno == EINTR);
    // FIONREAD said it is all there and only this thread reads now: anything short is a broken
    // connection, which the next read() reports
    if (got != static_cast<ssize_t>(kHeaderBytes + length)) throw MakeSysError(env, "recvmsg", got < 0 ? errno : EPROTO, "a buffered frame came short");
    Napi::Object out = Napi::Object::New(env);
    out.Set("version", version);
    out.Set("type", type);
    out.Set("flags", Le16(h + 4));
    out.Set("payload", payload);
    out.Set("pages", 0);
    out.Set("batches", 0);
    out.Set("bytes", 0);
    out.Set("lastRound", -1.0);
    return out;
  }

  // Wakes every thread blocked on this connection (they fail) and tells the peer we are gone.
  Napi::Value Shutdown(const Napi::CallbackInfo& info) {
    if (fd_) shutdown(fd_->fd, SHUT_RDWR);  // ENOTCONN when the peer already left: nothing to undo
    return info.Env().Undefined();
  }

  // finish(timeoutMs) -> Promise<void>: a graceful close after our last frame. Sends FIN, then
  // reads and discards until the peer closes too (or the time is up), so the kernel never
  // answers unread data with a reset that could destroy the frame we just sent (an ERROR).
  Napi::Value Finish(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    double ms = info[0].As<Napi::Number>().DoubleValue();
    return Task<int>::Start(
        env,
        [fd, ms](int&, SysError&) {
          shutdown(fd->fd, SHUT_WR);  // ENOTCONN if the peer already reset: nothing left to flush
          timespec t0;
          clock_gettime(CLOCK_MONOTONIC, &t0);
          static thread_local uint8_t sink[65536];
          for (;;) {
            timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            double left = ms - ((t.tv_sec - t0.tv_sec) * 1e3 + (t.tv_nsec - t0.tv_nsec) / 1e6);
            if (left <= 0) break;
            pollfd p{fd->fd, POLLIN, 0};
            int r = poll(&p, 1, static_cast<int>(left) + 1);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;  // time is up (or poll failed): close anyway
            ssize_t n = recv(fd->fd, sink, sizeof sink, MSG_DONTWAIT);
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (n <= 0) break;  // EOF: the peer closed; or reset: nothing more to protect
          }
        },
        [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); });
  }

  // The descriptor, for a post-copy service that takes a dup of it (no read or write may be
  // left running on this Wire then).
  Napi::Value GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), Live(info.Env())->fd); }

  // Drops our reference without shutting the connection down: a post-copy service holds its
  // own dup of the descriptor and goes on using the connection.
  Napi::Value Forget(const Napi::CallbackInfo& info) {
    fd_.reset();
    return info.Env().Undefined();
  }

  // Drops our reference; the descriptor closes when the last operation using it returns.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (fd_) shutdown(fd_->fd, SHUT_RDWR);
    fd_.reset();
    return info.Env().Undefined();
  }

  // setTimeouts(recvMs, sendMs): 0 means wait forever. A receive that sees no byte for
  // recvMs fails with ERR_LIVEMIG_TIMEOUT.
  Napi::Value SetTimeouts(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    for (int i = 0; i < 2; i++) {
      double ms = info[i].As<Napi::Number>().DoubleValue();
      timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>(static_cast<int64_t>(ms) % 1000 * 1000)};
      if (setsockopt(fd->fd, SOL_SOCKET, i == 0 ? SO_RCVTIMEO : SO_SNDTIMEO, &tv, sizeof tv) != 0) throw MakeSysError(env, "setsockopt(SO_*TIMEO)", errno);
    }
    return env.Undefined();
  }

  std::shared_ptr<Fd> fd_;
  // frame rules of incoming PAGES_ENC frames; used by one read at a time
  std::shared_ptr<FrameOrder> order_ = std::make_shared<FrameOrder>();
};

Napi::Value PageHashJs(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> b = info[0].As<Napi::Buffer<uint8_t>>();
  if (b.Length() % 128 != 0) throw Napi::RangeError::New(info.Env(), "pageHash input must be a multiple of 128 bytes");
  return Napi::BigInt::New(info.Env(), PageHash(b.Data(), b.Length()));
}

Napi::Value PageHashVariantsJs(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> b = info[0].As<Napi::Buffer<uint8_t>>();
  if (b.Length() % 128 != 0) throw Napi::RangeError::New(info.Env(), "pageHash input must be a multiple of 128 bytes");
  uint64_t v[3];
  int n = PageHashVariants(b.Data(), b.Length(), v);
  Napi::Array out = Napi::Array::New(info.Env(), n);
  for (int i = 0; i < n; i++) out.Set(i, Napi::BigInt::New(info.Env(), v[i]));
  return out;
}

}  // namespace

void InitWire(Napi::Env env, Napi::Object exports) {
  exports.Set("Wire", Wire::Init(env));
  exports.Set("pageHash", Napi::Function::New(env, PageHashJs));
  exports.Set("pageHashVariants", Napi::Function::New(env, PageHashVariantsJs));
}

}  // namespace livemig
