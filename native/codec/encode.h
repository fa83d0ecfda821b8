// Page encodings (issue 4): zero pages, deduplication against content the receiver holds,
// and LZ4. The sender keeps an index of what it knows the receiver holds (a subset of the
// truth); a dup names a page, and the receiver checks it against its own page hashes.
// Spec: docs/PROTOCOL.md, "PAGES_ENC" and "What the sender knows the receiver holds".
#pragma once

#include <napi.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "wire/format.h"

namespace livemig {

// kIncompressible and kSkip never go on the wire: the sender's classifier marks raw pages its
// sample found incompressible, and pages the receiver already holds in place.
// kLz4Cont: this page is part of the LZ4 block of the lz4 page before it (no body of its own);
// 4 is not used (an encoding removed before release) and is refused like any unknown value.
// The wire's values come from wire/format.h.
enum PageEncoding : uint8_t {
  kRaw = wire::kEncRaw,
  kZero = wire::kEncZero,
  kDup = wire::kEncDup,
  kLz4 = wire::kEncLz4,
  kLz4Cont = wire::kEncLz4Cont,
  kIncompressible = 254,
  kSkip = 255,
};
constexpr bool IsWireEncoding(uint8_t e) { return e <= kLz4 || e == kLz4Cont; }
// An LZ4 block covers at most this many pages (one lz4 page and its continuations).
constexpr uint32_t kMaxLz4Group = wire::kMaxLz4Group;
// A dup's body: u64 content hash, u32 page of the receiver holding that content.
constexpr uint32_t kDupBody = wire::kDupBodyBytes;

// Where each page sits in the frame being built or applied, to enforce the frame rules: a page
// appears at most once, and a dup is never resolved from a page written later in the same
// frame (the receiver may land raw bodies in the region before it resolves the dups).
struct FrameOrder {
  std::vector<uint32_t> gen, pos;
  uint32_t cur = 0;
  // false if a page repeats
  bool Begin(const uint32_t* idx, size_t n, size_t pageCount) {
    if (gen.size() != pageCount) gen.assign(pageCount, 0), pos.assign(pageCount, 0), cur = 0;
    if (++cur == 0) std::fill(gen.begin(), gen.end(), 0), cur = 1;
    bool unique = true;
    for (size_t k = 0; k < n; k++) {
      if (gen[idx[k]] == cur) unique = false;
      gen[idx[k]] = cur;
      pos[idx[k]] = static_cast<uint32_t>(k);
    }
    return unique;
  }
  bool WrittenAfter(uint32_t page, size_t k) const { return gen[page] == cur && pos[page] > k; }
  void Reserve(size_t pageCount) {
    gen.assign(pageCount, 0);
    pos.assign(pageCount, 0);
    cur = 0;
  }
};

// Open-addressing map from content hash to one page holding it (linear probing, backward-shift
// deletion): one cache miss per operation, no allocation after construction.
class HeadTable {
 public:
  static constexpr uint32_t kNone = 0xffffffffu;
  void Reset(uint64_t pageCount) {
    size_t cap = 16;
    while (cap < pageCount * 2) cap <<= 1;
    slots_.assign(cap, Entry{});
    mask_ = cap - 1;
  }
  uint32_t Get(uint64_t h) const {
    for (size_t i = Slot(h);; i = (i + 1) & mask_) {
      const Entry& e = slots_[i];
      if (e.page == kNone) return kNone;
      if (e.key == h) return e.page;
    }
  }
  // Inserts h -> page unless h is present; returns the page now stored.
  uint32_t Emplace(uint64_t h, uint32_t page) {
    size_t i = Slot(h);
    for (; slots_[i].page != kNone; i = (i + 1) & mask_)
      if (slots_[i].key == h) return slots_[i].page;
    slots_[i] = Entry{h, page};
    return page;
  }
  void Replace(uint64_t h, uint32_t page) {
    for (size_t i = Slot(h); slots_[i].page != kNone; i = (i + 1) & mask_)
      if (slots_[i].key == h) {
        slots_[i].page = page;
        return;
      }
  }
  void Erase(uint64_t h) {
    size_t i = Slot(h);
    for (; slots_[i].page != kNone; i = (i + 1) & mask_)
      if (slots_[i].key == h) break;
    if (slots_[i].page == kNone) return;
    // backward-shift: move later entries of the probe run into the hole
    for (size_t j = (i + 1) & mask_; slots_[j].page != kNone; j = (j + 1) & mask_) {
      size_t home = Slot(slots_[j].key);
      bool movable = i <= j ? (home <= i || home > j) : (home <= i && home > j);
      if (movable) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i].page = kNone;
  }
  void Prefetch(uint64_t h) const { __builtin_prefetch(&slots_[Slot(h)]); }
  size_t Count() const {
    size_t n = 0;
    for (const Entry& e : slots_) n += e.page != kNone;
    return n;
  }

 private:
  struct Entry {
    uint64_t key = 0;
    uint32_t page = kNone;
  };
  size_t Slot(uint64_t h) const { return static_cast<size_t>((h * 0x9E3779B97F4A7C15ull) >> 17) & mask_; }
  std::vector<Entry> slots_;
  size_t mask_ = 0;
};

// A cheap fingerprint of a page (its first 32 bytes). The sender keeps a bitset of the
// fingerprints of content it indexed (never cleared: a stale bit only costs an early hash): a
// page whose bit is clear holds no indexed content, so it need not be hashed before sending.
inline uint64_t PageFingerprint(const uint8_t* p) {
  uint64_t w[4];
  std::memcpy(w, p, 32);
  uint64_t f = (w[0] ^ (w[1] * 0x9E3779B97F4A7C15ull)) + (w[2] ^ (w[3] * 0xC2B2AE3D27D4EB4Full));
  return f ^ (f >> 29);
}

// The sender's knowledge of the receiver's region: content hash -> every page known to hold it
// (a doubly linked list per hash), plus each page's hash. Only what it knows the receiver
// holds, so every dup it sends names a page that does hold that content; the receiver checks
// each against its own page hashes.
struct DedupState {
  static constexpr uint32_t kNone = HeadTable::kNone;
  static constexpr size_t kFpBits = size_t{1} << 23;  // 1 MiB
  std::vector<uint64_t> holder;                       // content hash of each page, if known
  std::vector<uint8_t> known;
  std::vector<uint32_t> next, prev;
  HeadTable head;                  // content hash -> first page holding it
  std::vector<uint64_t> fpBits;    // sender only
  std::vector<uint64_t> seenBits;  // sender only: fingerprints of raw pages sent
  FrameOrder order;

  void Reset(uint64_t pageCount) {
    holder.assign(pageCount, 0);
    known.assign(pageCount, 0);
    next.assign(pageCount, kNone);
    prev.assign(pageCount, kNone);
    head.Reset(pageCount);
    // Allocated and touched now, during the handshake: first touches of fresh memory are slow
    // on a VM (the host backs each page), and would otherwise land in the first pass.
    fpBits.assign(kFpBits / 64, 0);
    seenBits.assign(kFpBits / 64, 0);
    order.Reserve(pageCount);
  }
  // Whether some indexed page may hold content with this page's fingerprint.
  bool MayHold(const uint8_t* page) const {
    uint64_t f = PageFingerprint(page) & (kFpBits - 1);
    return (fpBits[f >> 6] >> (f & 63)) & 1;
  }
  // Whether a page with this fingerprint was sent raw before (and notes that it now was). A
  // raw page is worth indexing only when its content recurs: most pages are unique.
  bool SeenBefore(const uint8_t* page) {
    uint64_t f = PageFingerprint(page) & (kFpBits - 1);
    uint64_t bit = uint64_t{1} << (f & 63);
    bool seen = seenBits[f >> 6] & bit;
    seenBits[f >> 6] |= bit;
    return seen;
  }
  // Records the fingerprint of content just indexed.
  void NoteFingerprint(uint32_t, const uint8_t* page) {
    uint64_t f = PageFingerprint(page) & (kFpBits - 1);
    fpBits[f >> 6] |= uint64_t{1} << (f & 63);
  }
  // The page now holds content `h`.
  void Set(uint32_t page, uint64_t h) {
    Forget(page);
    holder[page] = h;
    known[page] = 1;
    uint32_t first = head.Emplace(h, page);
    if (first != page) {  // insert after the first holder
      next[page] = next[first];
      prev[page] = first;
      if (next[first] != kNone) prev[next[first]] = page;
      next[first] = page;
    }
  }
  // What the page holds is not known (to the sender: not known to be at the receiver).
  void Invalidate(uint32_t page) { Forget(page); }
  // A page holding `h` that is not written later in the current frame than position k.
  bool Find(uint64_t h, size_t k, uint32_t* page) const {
    for (uint32_t y = head.Get(h), tries = 0; y != kNone && tries < 8; y = next[y], tries++) {
      if (!order.WrittenAfter(y, k)) {
        *page = y;
        return true;
      }
    }
    return false;
  }
  // The encoding of page x (k-th of its frame, content hash h), entering in the index what the
  // receiver will hold. A raw page is entered only if `rawIndexed` (its body is the hashed
  // bytes); otherwise the caller may Set it once it knows the bytes sent had hash h.
  uint8_t Choose(uint32_t x, size_t k, uint64_t h, bool zero, bool zeroOn, bool dedupOn, bool rawIndexed, uint32_t* source) {
    uint32_t y = 0;
    if (known[x] && holder[x] == h && (dedupOn || (zero && zeroOn))) return kSkip;
    uint8_t e;
    if (zero && zeroOn) e = kZero;
    else if (dedupOn && Find(h, k, &y) && y != x) e = kDup;
    else e = kRaw;
    if (e == kDup) *source = y;
    if (e == kRaw && !rawIndexed) Invalidate(x);
    else Set(x, h);
    return e;
  }

 private:
  void Forget(uint32_t page) {
    if (!known[page]) return;
    known[page] = 0;
    uint32_t p = prev[page], n = next[page];
    if (p != kNone) next[p] = n;
    else if (n != kNone) head.Replace(holder[page], n);
    else head.Erase(holder[page]);
    if (n != kNone) prev[n] = p;
    next[page] = prev[page] = kNone;
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
// A cheap sample: false when the page looks like random bytes, which LZ4 cannot shrink.
bool LooksCompressible(const uint8_t* p, size_t len);
// Decodes an LZ4 block into exactly `dstLen` bytes; false if the input is malformed, reads or
// refers outside its bounds, or does not produce exactly dstLen bytes.
bool Lz4DecodeBlock(const uint8_t* src, size_t srcLen, uint8_t* dst, size_t dstLen);

}  // namespace livemig
