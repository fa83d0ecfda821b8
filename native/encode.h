// Page encodings (issue 4): zero pages, deduplication against content the receiver holds,
// and LZ4. The dedup index is mirrored: sender and receiver apply the same update rule to
// every page in stream order, so the sender always knows what the receiver can copy from.
// Spec: docs/PROTOCOL.md, "PAGES_ENC" and "Deduplication index".
#pragma once

#include <napi.h>

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace livemig {

enum PageEncoding : uint8_t { kRaw = 0, kZero = 1, kDup = 2, kLz4 = 3, kSkip = 255 };

// Which pages hold which content (by page hash), as both sides know it.
struct DedupState {
  std::vector<uint64_t> holder;  // content hash of each page, if known
  std::vector<uint8_t> known;
  std::unordered_map<uint64_t, uint32_t> where;  // content hash -> one page holding it

  void Reset(uint64_t pageCount) {
    holder.assign(pageCount, 0);
    known.assign(pageCount, 0);
    where.clear();
  }
  // The page now holds content `h` (every encoding, in stream order).
  void Set(uint32_t page, uint64_t h) {
    Forget(page);
    holder[page] = h;
    known[page] = 1;
    where.emplace(h, page);  // keeps an existing holder
  }
  // The page now holds content the index must not offer (sent from live memory, unhashed).
  void Invalidate(uint32_t page) {
    Forget(page);
    known[page] = 0;
  }
  bool Find(uint64_t h, uint32_t* page) const {
    auto it = where.find(h);
    if (it == where.end()) return false;
    *page = it->second;
    return true;
  }

 private:
  void Forget(uint32_t page) {
    if (!known[page]) return;
    auto it = where.find(holder[page]);
    if (it != where.end() && it->second == page) where.erase(it);
  }
};

class Dedup : public Napi::ObjectWrap<Dedup> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Dedup(const Napi::CallbackInfo& info);
  static Dedup* Unwrap(const Napi::Value& v) { return Napi::ObjectWrap<Dedup>::Unwrap(v.As<Napi::Object>()); }
  DedupState state;

 private:
  Napi::Value InitImage(const Napi::CallbackInfo& info);
  Napi::Value Size(const Napi::CallbackInfo& info);
};

// Hash of an all-zero page of `pageSize` bytes.
uint64_t ZeroPageHash(size_t pageSize);
bool IsZeroPage(const uint8_t* p, size_t len);
// Decodes an LZ4 block into exactly `dstLen` bytes; false if the input is malformed, reads or
// refers outside its bounds, or does not produce exactly dstLen bytes.
bool Lz4DecodeBlock(const uint8_t* src, size_t srcLen, uint8_t* dst, size_t dstLen);

}  // namespace livemig
