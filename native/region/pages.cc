// Hot loops over many pages at once. Page hashes are PageHash (pagehash.h); Xxh64 here is
// bit-compatible with xxhash-wasm's h64 and serves the digest over the hash table.
#include <cstring>
#include <thread>
#include <vector>

#include "codec/pagehash.h"
#include "common.h"
#include "region/region.h"
#include "wire/format.h"

namespace livemig {

namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t Rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // x86-64 and arm64 Linux are little-endian, as XXH64 reads
}
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t Round(uint64_t acc, uint64_t lane) {
  acc += lane * P2;
  acc = Rotl(acc, 31);
  return acc * P1;
}
inline uint64_t Merge(uint64_t acc, uint64_t v) {
  acc ^= Round(0, v);
  return acc * P1 + P4;
}

}  // namespace

uint64_t Xxh64(const uint8_t* p, size_t len, uint64_t seed) {
  const uint8_t* end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
    const uint8_t* limit = end - 32;
    do {
      v1 = Round(v1, Load64(p));
      v2 = Round(v2, Load64(p + 8));
      v3 = Round(v3, Load64(p + 16));
      v4 = Round(v4, Load64(p + 24));
      p += 32;
    } while (p <= limit);
    h = Rotl(v1, 1) + Rotl(v2, 7) + Rotl(v3, 12) + Rotl(v4, 18);
    h = Merge(h, v1);
    h = Merge(h, v2);
    h = Merge(h, v3);
    h = Merge(h, v4);
  } else {
    h = seed + P5;
  }
  h += static_cast<uint64_t>(len);
  for (; p + 8 <= end; p += 8) h = Rotl(h ^ Round(0, Load64(p)), 27) * P1 + P4;
  if (p + 4 <= end) {
    h = Rotl(h ^ (static_cast<uint64_t>(Load32(p)) * P1), 23) * P2 + P3;
    p += 4;
  }
  for (; p < end; p++) h = Rotl(h ^ (*p * P5), 11) * P1;
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

namespace {

// Splits [0, count) over up to two threads: the machines we target have two cores, and the
// caller's thread is otherwise idle waiting for the result.
template <typename F>
void Parallel(uint64_t count, F fn) {
  if (count < 4096) {
    fn(0, count);
    return;
  }
  uint64_t half = count / 2;
  std::thread t([&] { fn(half, count); });
  fn(0, half);
  t.join();
}

Napi::Value Hash(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> b = info[0].As<Napi::Buffer<uint8_t>>();
  return Napi::BigInt::New(info.Env(), Xxh64(b.Data(), b.Length(), ToU64(info[1])));
}

// hashCompare(region, firstPage, pageCount, pageSize, hashes: BigUint64Array) -> Promise<Uint32Array>
// Hashes every page in the range, returns those whose hash differs from `hashes`, and stores
// the new hashes. The caller must not touch `hashes` until the promise settles.
Napi::Value HashCompare(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region* region = Region::Unwrap(info[0]);
  Mapping* m = region->LiveMapping(env);
  if (!m) return env.Undefined();
  uint64_t first = ToU64(info[1]);
  uint64_t count = ToU64(info[2]);
  uint64_t pageSize = ToU64(info[3]);
  Napi::BigUint64Array hashes = info[4].As<Napi::BigUint64Array>();
  if ((first + count) * pageSize > m->size || hashes.ElementLength() < count) {
    throw Napi::RangeError::New(env, "hashCompare range outside the region or hash table");
  }
  uint64_t* table = hashes.Data();
  m->Ref();
  return Task<std::vector<uint32_t>>::Start(
      env,
      [m, first, count, pageSize, table](std::vector<uint32_t>& changed, SysError&) {
        std::vector<uint32_t> upper;
        Parallel(count, [&](uint64_t from, uint64_t to) {
          std::vector<uint32_t>& out = from == 0 ? changed : upper;
          const uint8_t* base = m->addr + first * pageSize;
          for (uint64_t i = from; i < to; i++) {
            uint64_t h = PageHash(base + i * pageSize, pageSize);
            if (h != table[i]) {
              table[i] = h;
              out.push_back(static_cast<uint32_t>(i));
            }
          }
        });
        changed.insert(changed.end(), upper.begin(), upper.end());
        m->Unref();
      },
      [](Napi::Env e, std::vector<uint32_t>& changed) -> Napi::Value { return PagesToJs(e, std::move(changed)); }, {info[0], info[4]});
}

// The commitment digest: XXH64 over the per-page hash table (8 bytes per page).
Napi::Value Digest(const Napi::CallbackInfo& info) {
  Napi::BigUint64Array hashes = info[0].As<Napi::BigUint64Array>();
  return Napi::BigInt::New(info.Env(), Xxh64(reinterpret_cast<const uint8_t*>(hashes.Data()), hashes.ByteLength(), 0));
}

// hashAll(region, hashes, data?: Uint8Array) -> Promise<void>: every page's PageHash (two
// threads). With `data` (a byte per page), a page marked 0 is a hole of the backing file: it
// holds zeros by definition and is not read (a read would allocate it), its hash the zero page's.
Napi::Value HashAll(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Region* region = Region::Unwrap(info[0]);
  Mapping* m = region->LiveMapping(env);
  if (!m) return env.Undefined();
  Napi::BigUint64Array hashes = info[1].As<Napi::BigUint64Array>();
  uint64_t count = m->size / wire::kPageSize;
  if (hashes.ElementLength() < count) throw Napi::RangeError::New(env, "hash table smaller than the region");
  const uint8_t* data = nullptr;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    if (!info[2].IsTypedArray() || info[2].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array ||
        info[2].As<Napi::Uint8Array>().ElementLength() != count)
      throw Napi::RangeError::New(env, "data must be a Uint8Array of one entry per page");
    data = info[2].As<Napi::Uint8Array>().Data();
  }
  uint64_t* table = hashes.Data();
  static const uint8_t kZero[wire::kPageSize] = {};
  const uint64_t zero = PageHash(kZero, wire::kPageSize);
  m->Ref();
  return Task<int>::Start(
      env,
      [m, table, count, data, zero](int&, SysError&) {
        Parallel(count, [&](uint64_t from, uint64_t to) {
          for (uint64_t i = from; i < to; i++) table[i] = data && !data[i] ? zero : PageHash(m->addr + i * wire::kPageSize, wire::kPageSize);
        });
        m->Unref();
      },
      [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); }, {info[0], info[1], info.Length() > 2 ? info[2] : env.Undefined()});
}

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

// The commitment digest of a page-hash table (post-copy computes it on its own thread).
uint64_t DigestHashes(const uint64_t* hashes, size_t count) { return Xxh64(reinterpret_cast<const uint8_t*>(hashes), count * 8, 0); }

void InitPages(Napi::Env env, Napi::Object exports) {
  exports.Set("digestTable", Napi::Function::New(env, Digest));
  exports.Set("hashAll", Napi::Function::New(env, HashAll));
  exports.Set("xxh64", Napi::Function::New(env, Hash));
  exports.Set("hashCompare", Napi::Function::New(env, HashCompare));
  exports.Set("pageHash", Napi::Function::New(env, PageHashJs));
  exports.Set("pageHashVariants", Napi::Function::New(env, PageHashVariantsJs));
}

}  // namespace livemig
