// Receiving pages into the region (see receive_pages.h).
#include "wire/receive_pages.h"

#include <cstdio>
#include <cstring>
#include <string>

#include "codec/pagehash.h"
#include "io/socket.h"
#include "region/file_io.h"
#include "wire/format.h"

namespace livemig {
namespace wire {

namespace {

// What both page frames start with: the negotiated version, and the u32 round, u32 count
// prefix (count within the batch limit). `what` names the frame in messages.
bool ReadPagesPrefix(Link& link, const Sink& s, const char* what, uint8_t version, uint32_t length, uint32_t* round, uint32_t* count, SysError& err) {
  if (version != s.version) {
    return err.fail("ERR_LIVEMIG_VERSION", "frame of version " + std::to_string(version) + " after negotiating " + std::to_string(s.version)), false;
  }
  if (length < kPagesPrefixBytes) {
    return err.fail("ERR_LIVEMIG_PROTOCOL", std::string(what) + " payload of " + std::to_string(length) + " bytes is shorter than its prefix"), false;
  }
  uint8_t prefix[kPagesPrefixBytes];
  return link.RecvBytes(prefix, kPagesPrefixBytes, false, err) && CheckPagesPrefix(what, prefix, s.maxBatchPages, round, count, err);
}

}  // namespace

bool CheckSinkIndices(const Sink& s, uint32_t* idx, uint32_t count, SysError& err) {
  if (!DecodePageIndices(idx, count, s.pageCount, err)) return false;
  if (s.channels == 1) return true;
  for (uint32_t k = 0; k < count; k++) {
    if (!s.Owns(idx[k])) {
      return err.fail("ERR_LIVEMIG_PAGE_INDEX", "page " + std::to_string(idx[k]) + " arrived on channel " + std::to_string(s.channel) + " of " +
                                                    std::to_string(s.channels) + ", but its stripe goes on channel " +
                                                    std::to_string((idx[k] / kStripePages) % s.channels)),
             false;
    }
  }
  return true;
}

bool ReceivePages(Link& link, const Sink& s, uint8_t version, uint32_t length, ReadResult& r, std::vector<uint32_t>& idx, std::vector<iovec>& iov,
                  std::vector<uint8_t>& staging, SysError& err) {
  uint32_t round, count;
  if (!ReadPagesPrefix(link, s, "PAGES", version, length, &round, &count, err) || !CheckPlainPagesLength("PAGES", length, count, err)) return false;
  idx.resize(count);
  if (!link.RecvBytes(idx.data(), count * 4ULL, false, err)) return false;
  if (!CheckSinkIndices(s, idx.data(), count, err)) return false;
  iov.clear();
  if (WritesByFile(*s.m)) {
    // into a buffer, then the file: no fault per page of a fresh mapping (region/file_io.h)
    // grown, never shrunk: kept for the connection's life, a resize back up would zero it again
    const uint64_t bytes = uint64_t{count} * kPageSize;
    if (staging.size() < bytes) staging.resize(bytes);
    iov.push_back({staging.data(), bytes});
    if (count > 0 && !link.Recv(iov.data(), 1, false, err)) return false;
    PageWriter out(*s.m);
    for (uint32_t k = 0; k < count; k++) {
      const uint8_t* page = staging.data() + uint64_t{k} * kPageSize;
      s.hashes[idx[k]] = PageHash(page, kPageSize);
      if (!out.Put(idx[k], page, err)) return false;
    }
    if (!out.Flush(err)) return false;
  } else {
    PageIovecs(s.m->addr, idx.data(), count, iov);
    if (!link.Recv(iov.data(), static_cast<int>(iov.size()), false, err)) return false;
    for (uint32_t k = 0; k < count; k++) {
      s.hashes[idx[k]] = PageHash(s.m->addr + static_cast<uint64_t>(idx[k]) * kPageSize, kPageSize);
    }
  }
  r.pages += count;
  r.batches += 1;
  r.bytes += static_cast<double>(kHeaderBytes + length);
  r.lastRound = round;
  return true;
}

// Receives one PAGES_ENC payload: prefix, indices, encodings, then the bodies. Every index and
// encoding is checked before a body byte is read. Where the region is written through its
// file, or with lz4 pages, the body is read whole, then decoded and written; otherwise its
// layout is known from the encodings, so its size is checked too and raw bodies land straight
// in the region's pages (dup hashes in a side buffer). Pages are applied in order with the
// dedup index updated as the sender updated it. A malformed page fails the migration (the
// region is discarded then).
namespace {

// What a PAGES_ENC frame's head says: its pages' indices (in `idx`) and encodings.
struct EncodedHead {
  uint32_t round = 0, count = 0;
  uint64_t head = 0;  // bytes of prefix, indices and encodings
  std::vector<uint8_t> enc;
  bool anyLz4 = false;
  uint64_t fixedBody = 0;  // body size when there is no lz4 page
};

// Prefix, indices and encodings, every one checked (and the frame rules) before a body byte.
bool ReadEncodedHead(Link& link, const Sink& s, uint8_t version, uint32_t length, EncodedHead& h, std::vector<uint32_t>& idx, SysError& err) {
  if (!s.order) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC without negotiated encodings");
    return false;
  }
  if (!ReadPagesPrefix(link, s, "PAGES_ENC", version, length, &h.round, &h.count, err)) return false;
  const uint32_t count = h.count;
  h.head = kPagesPrefixBytes + static_cast<uint64_t>(count) * 5;
  if (length < h.head) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC of " + std::to_string(count) + " pages is shorter than its index and encodings");
    return false;
  }
  idx.resize(count);
  std::vector<uint8_t>& enc = h.enc;
  enc.resize(count);
  if (!link.RecvBytes(idx.data(), count * 4ULL, false, err) || !link.RecvBytes(enc.data(), count, false, err)) return false;
  if (!CheckSinkIndices(s, idx.data(), count, err)) return false;
  for (uint32_t k = 0; k < count; k++) {
    if (!IsWireEncoding(enc[k])) {
      err.fail("ERR_LIVEMIG_PROTOCOL", "unknown page encoding " + std::to_string(enc[k]));
      return false;
    }
    if (enc[k] == kLz4Cont) {
      // a continuation follows an lz4 page or another continuation, at most a group's length
      uint32_t g = 1;
      while (g <= k && enc[k - g] == kLz4Cont) g++;
      if (g > k || enc[k - g] != kLz4 || g >= kMaxLz4Group) {
        err.fail("ERR_LIVEMIG_PROTOCOL",
                 "lz4 continuation page " + std::to_string(idx[k]) + " without an lz4 block of at most " + std::to_string(kMaxLz4Group) + " pages before it");
        return false;
      }
    }
    h.anyLz4 |= enc[k] == kLz4;
    h.fixedBody += enc[k] == kRaw ? kPageSize : enc[k] == kDup ? kDupBody : 0;
  }
  if (!s.order->Begin(idx.data(), count, s.pageCount)) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC lists a page twice");
    return false;
  }
  return true;
}

// The bodies: without lz4 pages their layout is known from the encodings, so their size is
// checked first; written through the mapping, raw bodies then land straight in the region's
// pages (dup bodies in `body` at kDupBody * k); otherwise the body is read whole, to be applied.
bool ReceiveBodies(Link& link, const Sink& s, uint32_t length, const EncodedHead& h, const std::vector<uint32_t>& idx, std::vector<uint8_t>& body,
                   SysError& err) {
  const uint32_t count = h.count;
  const std::vector<uint8_t>& enc = h.enc;
  std::vector<iovec> iov;
  if (!h.anyLz4 && h.fixedBody != length - h.head) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC bodies of " + std::to_string(count) + " pages must be " + std::to_string(h.fixedBody) + " bytes, got " +
                                         std::to_string(length - h.head));
    return false;
  }
  if (!h.anyLz4 && !WritesByFile(*s.m)) {
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
    if (!iov.empty() && !link.Recv(iov.data(), static_cast<int>(iov.size()), false, err)) return false;
  } else {
    body.resize(length - h.head);
    if (!link.RecvBytes(body.data(), body.size(), false, err)) return false;
  }
  return true;
}

// Applies the pages in order, updating the hashes as the sender did; a malformed page fails.
bool ApplyEncoded(const Sink& s, uint32_t length, const EncodedHead& h, const std::vector<uint32_t>& idx, std::vector<uint8_t>& body, ReadResult& r,
                  SysError& err) {
  const uint32_t count = h.count;
  const std::vector<uint8_t>& enc = h.enc;
  const bool direct = !h.anyLz4 && !WritesByFile(*s.m);
  const uint64_t zh = ZeroPageHash(kPageSize);
  size_t pos = 0;
  std::vector<uint8_t> lz4Scratch, dupScratch(kPageSize);
  PageWriter out(*s.m);
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
          if (!need(kPageSize) || !out.Put(x, body.data() + pos, err)) return false;
          h = PageHash(body.data() + pos, kPageSize);
          pos += kPageSize;
        } else {
          h = PageHash(dst, kPageSize);
        }
        break;
      case kZero:
        if (!out.Zero(x, err)) return false;
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
        if (y < s.pageCount && !s.Owns(y)) {
          err.fail("ERR_LIVEMIG_PROTOCOL", std::string("dup reference to page ") + std::to_string(y) + " on channel " + std::to_string(s.channel) +
                                               ": that page's stripe goes on another channel");
          return false;
        }
        if (y >= s.pageCount || s.hashes[y] != ref) {
          err.fail("ERR_LIVEMIG_PROTOCOL",
                   std::string("dup reference to content ") + hex + " in page " + std::to_string(y) + ", which this receiver does not hold there");
          return false;
        }
        if (s.order->WrittenAfter(y, k)) {
          err.fail("ERR_LIVEMIG_PROTOCOL",
                   std::string("dup reference to content ") + hex + " in page " + std::to_string(y) + ", which this frame writes later");
          return false;
        }
        // its own buffer, written before the next dup reuses it
        if (y != x && !(out.Get(y, dupScratch.data(), err) && out.Put(x, dupScratch.data(), err) && out.Flush(err))) return false;
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
          if (!err.failed())
            err.fail("ERR_LIVEMIG_PROTOCOL",
                     "lz4 block of " + std::to_string(n) + " bytes for " + std::to_string(g) + " page(s) (must be 4.." + std::to_string(want) + ")");
          return false;
        }
        uint32_t original = Le32(body.data() + pos);
        if (original != want) {
          err.fail("ERR_LIVEMIG_PROTOCOL",
                   "lz4 block decompresses to " + std::to_string(original) + " bytes, not " + std::to_string(g) + " page(s) of " + std::to_string(kPageSize));
          return false;
        }
        // decoded into scratch, then to each of its pages, written before the next block; one
        // page written through the mapping decodes in place
        const bool inPlace = g == 1 && !out.ByFile();
        lz4Scratch.resize(want);
        uint8_t* decoded = inPlace ? dst : lz4Scratch.data();
        if (!Lz4DecodeBlock(body.data() + pos + 4, n - 4, decoded, want)) {
          err.fail("ERR_LIVEMIG_PROTOCOL", "corrupt lz4 page " + std::to_string(x));
          return false;
        }
        pos += n;
        for (uint32_t j = 0; j < g; j++) {
          const uint8_t* pj = decoded + uint64_t{j} * kPageSize;
          if (!inPlace && !out.Put(idx[k + j], pj, err)) return false;
          s.hashes[idx[k + j]] = PageHash(pj, kPageSize);
        }
        if (!out.Flush(err)) return false;
        h = s.hashes[x];
        k += g - 1;  // the continuations are applied
      }
    }
    s.hashes[x] = h;
  }
  if (!out.Flush(err)) return false;
  if (!direct && pos != body.size()) {
    err.fail("ERR_LIVEMIG_PROTOCOL", "PAGES_ENC body has " + std::to_string(body.size() - pos) + " bytes after its last page");
    return false;
  }
  r.pages += count;
  r.batches += 1;
  r.bytes += static_cast<double>(kHeaderBytes + length);
  r.lastRound = h.round;
  return true;
}

}  // namespace

bool ReceiveEncoded(Link& link, const Sink& s, uint8_t version, uint32_t length, ReadResult& r, std::vector<uint32_t>& idx, std::vector<uint8_t>& body,
                    SysError& err) {
  EncodedHead h;
  return ReadEncodedHead(link, s, version, length, h, idx, err) && ReceiveBodies(link, s, length, h, idx, body, err) &&
         ApplyEncoded(s, length, h, idx, body, r, err);
}

}  // namespace wire
}  // namespace livemig
