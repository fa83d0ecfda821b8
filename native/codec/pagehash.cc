#include "codec/pagehash.h"

#include <cstring>

namespace livemig {

namespace {

typedef uint64_t V8 __attribute__((vector_size(64)));

constexpr uint64_t K0[8] = {0x9E3779B185EBCA87ULL, 0xC2B2AE3D27D4EB4FULL, 0x165667B19E3779F9ULL, 0x85EBCA77C2B2AE63ULL,
                            0x27D4EB2F165667C5ULL, 0xFF51AFD7ED558CCDULL, 0xC4CEB9FE1A85EC53ULL, 0x2545F4914F6CDD1DULL};
constexpr uint64_t K1[8] = {0xD6E8FEB86659FD93ULL, 0xA0761D6478BD642FULL, 0xE7037ED1A0B428DBULL, 0x8EBC6AF09C88C6E3ULL,
                            0x589965CC75374CC3ULL, 0x1D8E4E27C47D124FULL, 0xBF58476D1CE4E5B9ULL, 0x94D049BB133111EBULL};

// Per-block key steps: every 128-byte block is keyed differently, so a word counts differently
// at each position (the first definition reused one key for every block, and sparse pages whose
// words merely sat in other blocks, or summed to the same value, collided).
constexpr uint64_t S0[8] = {0xA0761D6478BD642FULL, 0xE7037ED1A0B428DBULL, 0x8EBC6AF09C88C6E3ULL, 0x589965CC75374CC3ULL,
                            0x1D8E4E27C47D124FULL, 0xBF58476D1CE4E5B9ULL, 0x94D049BB133111EBULL, 0xD6E8FEB86659FD93ULL};
constexpr uint64_t S1[8] = {0xFF51AFD7ED558CCDULL, 0xC4CEB9FE1A85EC53ULL, 0x2545F4914F6CDD1DULL, 0x9E3779B97F4A7C15ULL,
                            0xBF58476D1CE4E5B9ULL, 0x94D049BB133111EBULL, 0x27D4EB2F165667C5ULL, 0x85EBCA77C2B2AE63ULL};

inline uint64_t Fold(uint64_t a, uint64_t b) {
  unsigned __int128 m = static_cast<unsigned __int128>(a) * b;
  return static_cast<uint64_t>(m) ^ static_cast<uint64_t>(m >> 64);
}

inline uint64_t Avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= 0xC2B2AE3D27D4EB4FULL;
  h ^= h >> 29;
  h *= 0x165667B19E3779F9ULL;
  h ^= h >> 32;
  return h;
}

// One body, compiled once per instruction set; the arithmetic is the same in each.
#define LIVEMIG_PAGE_HASH_BODY                                             \
  V8 key0, key1, acc0, acc1;                                               \
  std::memcpy(&key0, K0, 64);                                              \
  std::memcpy(&key1, K1, 64);                                              \
  acc0 = key1;                                                             \
  acc1 = key0;                                                             \
  V8 step0, step1;                                                         \
  std::memcpy(&step0, S0, 64);                                             \
  std::memcpy(&step1, S1, 64);                                             \
  for (size_t i = 0; i < len; i += 128) {                                  \
    V8 d0, d1;                                                             \
    std::memcpy(&d0, p + i, 64);                                           \
    std::memcpy(&d1, p + i + 64, 64);                                      \
    V8 x0 = d0 ^ key0, x1 = d1 ^ key1;                                     \
    x0 ^= x0 << 32;                                                        \
    x1 ^= x1 << 32;                                                        \
    acc0 += (x0 & 0xFFFFFFFFULL) * (x0 >> 32) + ((d0 << 32) | (d0 >> 32)); \
    acc1 += (x1 & 0xFFFFFFFFULL) * (x1 >> 32) + ((d1 << 32) | (d1 >> 32)); \
    key0 += step0;                                                         \
    key1 += step1;                                                         \
  }                                                                        \
  uint64_t a[8], b[8];                                                     \
  std::memcpy(a, &acc0, 64);                                               \
  std::memcpy(b, &acc1, 64);                                               \
  uint64_t h = static_cast<uint64_t>(len) * 0x9E3779B185EBCA87ULL;         \
  for (int l = 0; l < 8; l += 2) {                                         \
    h += Fold(a[l] ^ K1[l], a[l + 1] ^ K1[l + 1]);                         \
    h += Fold(b[l] ^ K0[l], b[l + 1] ^ K0[l + 1]);                         \
  }                                                                        \
  return Avalanche(h);

__attribute__((target("avx512f"))) uint64_t HashAvx512(const uint8_t* p, size_t len) { LIVEMIG_PAGE_HASH_BODY }
__attribute__((target("avx2"))) uint64_t HashAvx2(const uint8_t* p, size_t len) { LIVEMIG_PAGE_HASH_BODY }
uint64_t HashBaseline(const uint8_t* p, size_t len) { LIVEMIG_PAGE_HASH_BODY }

using HashFn = uint64_t (*)(const uint8_t*, size_t);

HashFn Choose() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return HashAvx512;
  if (__builtin_cpu_supports("avx2")) return HashAvx2;
  return HashBaseline;
}

const HashFn chosen = Choose();

}  // namespace

uint64_t PageHash(const uint8_t* p, size_t len) { return chosen(p, len); }

int PageHashVariants(const uint8_t* p, size_t len, uint64_t* out) {
  int n = 0;
  out[n++] = HashBaseline(p, len);
  if (__builtin_cpu_supports("avx2")) out[n++] = HashAvx2(p, len);
  if (__builtin_cpu_supports("avx512f")) out[n++] = HashAvx512(p, len);
  return n;
}

}  // namespace livemig
