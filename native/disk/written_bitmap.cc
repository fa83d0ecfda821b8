// A guest's written-block bitmap (contract 4, "reported" tracking): the VMM sets a bit per
// block after each completed write (lmg_disk_written), livemig takes the words with an atomic
// exchange, so a bit set while it reads is in this answer or the next one, never lost.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "common.h"

namespace livemig {

namespace {

struct WrittenBitmap {
  uint64_t* words = nullptr;
  size_t count = 0;  // words
  uint64_t blocks = 0;
};

void Unmap(Napi::Env, WrittenBitmap* b) {
  if (b->words) munmap(b->words, b->count * sizeof(uint64_t));
  delete b;
}

// writtenBitmapOpen(fd, blocks) -> a handle. The memfd must be sealed against shrinking: a
// guest that truncated it under livemig's mapping would kill livemig with SIGBUS.
Napi::Value WrittenBitmapOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "writtenBitmapOpen(fd, blocks)");
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t blocks = info[1].As<Napi::Number>().Int64Value();
  if (fd < 0 || blocks <= 0 || blocks > (int64_t{1} << 40)) throw Napi::RangeError::New(env, "a descriptor and 1..2^40 blocks");
  const size_t count = static_cast<size_t>((blocks + 63) / 64);
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) throw MakeSysError(env, "fcntl(F_GET_SEALS) on the written-block bitmap", errno);
  if (!(seals & F_SEAL_SHRINK)) throw Napi::Error::New(env, "the written-block bitmap is not sealed against shrinking (F_SEAL_SHRINK)");
  struct stat st;
  if (fstat(fd, &st) != 0) throw MakeSysError(env, "fstat on the written-block bitmap", errno);
  if (static_cast<uint64_t>(st.st_size) < count * sizeof(uint64_t))
    throw Napi::RangeError::New(env, "the written-block bitmap holds " + std::to_string(st.st_size) + " bytes, " + std::to_string(count * 8) + " needed");
  void* a = mmap(nullptr, count * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (a == MAP_FAILED) throw MakeSysError(env, "mapping the written-block bitmap", errno);
  auto* b = new WrittenBitmap{static_cast<uint64_t*>(a), count, static_cast<uint64_t>(blocks)};
  return Napi::External<WrittenBitmap>::New(env, b, Unmap);
}

WrittenBitmap* Handle(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsExternal()) throw Napi::TypeError::New(info.Env(), "a written-block bitmap handle");
  return info[0].As<Napi::External<WrittenBitmap>>().Data();
}

// writtenBitmapTake(handle) -> Float64Array [first, end, ...]: the blocks marked since the last
// take, as ascending runs, their bits cleared.
Napi::Value WrittenBitmapTake(const Napi::CallbackInfo& info) {
  WrittenBitmap* b = Handle(info);
  if (!b->words) throw Napi::Error::New(info.Env(), "the written-block bitmap is closed");
  std::vector<double> runs;
  for (size_t w = 0; w < b->count; w++) {
    if (__atomic_load_n(&b->words[w], __ATOMIC_RELAXED) == 0) continue;
    uint64_t bits = __atomic_exchange_n(&b->words[w], 0, __ATOMIC_ACQUIRE);
    while (bits) {
      const unsigned lo = static_cast<unsigned>(__builtin_ctzll(bits));
      const uint64_t shifted = bits >> lo;
      const unsigned len = ~shifted == 0 ? 64 - lo : static_cast<unsigned>(__builtin_ctzll(~shifted));
      uint64_t first = w * 64 + lo, end = std::min<uint64_t>(first + len, b->blocks);
      if (first >= end) break;  // bits past the last block: a hostile guest's, ignored
      if (!runs.empty() && runs.back() == static_cast<double>(first)) runs.back() = static_cast<double>(end);
      else runs.push_back(static_cast<double>(first)), runs.push_back(static_cast<double>(end));
      bits = lo + len >= 64 ? 0 : bits & ~(((len == 64 ? ~0ULL : (1ULL << len) - 1)) << lo);
    }
  }
  Napi::Float64Array out = Napi::Float64Array::New(info.Env(), runs.size());
  if (!runs.empty()) std::memcpy(out.Data(), runs.data(), runs.size() * sizeof(double));
  return out;
}

Napi::Value WrittenBitmapClose(const Napi::CallbackInfo& info) {
  WrittenBitmap* b = Handle(info);
  if (b->words) munmap(b->words, b->count * sizeof(uint64_t));
  b->words = nullptr;
  return info.Env().Undefined();
}

}  // namespace

void InitWrittenBitmap(Napi::Env env, Napi::Object exports) {
  exports.Set("writtenBitmapOpen", Napi::Function::New(env, WrittenBitmapOpen));
  exports.Set("writtenBitmapTake", Napi::Function::New(env, WrittenBitmapTake));
  exports.Set("writtenBitmapClose", Napi::Function::New(env, WrittenBitmapClose));
}

}  // namespace livemig
