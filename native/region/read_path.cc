// Reads through the source's mapping (see read_path.h), guarded against SIGBUS.
#include "region/read_path.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <vector>

#include "codec/encode.h"
#include "region/file_io.h"

namespace livemig {

namespace {

constexpr uint64_t kPage = 4096;
// pages a mincore call and a guarded copy cover at most: a batch's slice
constexpr size_t kRunPages = 256;

thread_local sigjmp_buf* tGuard = nullptr;
struct sigaction gPrevious;

// A SIGBUS inside a guarded read returns to it; any other goes where it went before.
void OnSigbus(int sig, siginfo_t* info, void* context) {
  if (sigjmp_buf* g = tGuard) {
    tGuard = nullptr;
    siglongjmp(*g, 1);
  }
  if ((gPrevious.sa_flags & SA_SIGINFO) && gPrevious.sa_sigaction) return gPrevious.sa_sigaction(sig, info, context);
  if (gPrevious.sa_handler != SIG_DFL && gPrevious.sa_handler != SIG_IGN) return gPrevious.sa_handler(sig);
  signal(SIGBUS, SIG_DFL);
  raise(SIGBUS);
}

void InstallGuard() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = OnSigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &gPrevious);
  });
}

// One run of resident pages, [from, from+count) of idx, each at its own place in out. Returns
// false if the read faulted (the caller reads the run through the files instead).
bool CopyResidentRun(const Mapping& m, const uint32_t* idx, size_t from, size_t count, uint8_t* out, uint8_t* zeroOut) {
  sigjmp_buf guard;
  // savemask 0: no syscall per run; SA_NODEFER left SIGBUS unblocked in the handler
  if (sigsetjmp(guard, 0) != 0) return false;
  tGuard = &guard;
  for (size_t k = from; k < from + count; k++) {
    const uint8_t* src = m.addr + uint64_t{idx[k]} * kPage;
    if (zeroOut && IsZeroPage(src, kPage)) {
      zeroOut[k] = 1;
      continue;
    }
    std::memcpy(out + k * kPage, src, kPage);
  }
  tGuard = nullptr;
  return true;
}

}  // namespace

bool ReadInPlaceLocked(Mapping& m, const uint32_t* idx, size_t n, uint8_t* out, uint8_t* zeroOut, SysError& err) {
  if (zeroOut) std::memset(zeroOut, 0, n);
  // a release swaps the mapping for anonymous memory before it takes the files: one that
  // began before the read is seen here, one that began during it is seen after
  if (m.released.load()) return err.set("read", EBADF, "the region was released"), false;
  unsigned char resident[kRunPages];
  for (size_t k = 0; k < n;) {
    size_t run = 1;
    while (k + run < n && run < kRunPages && idx[k + run] == idx[k] + run && uint64_t{idx[k] + run} * kPage < m.size) run++;
    if (uint64_t{idx[k]} * kPage >= m.size) return err.set("read", EINVAL, "page " + std::to_string(idx[k]) + " beyond the region"), false;
    bool known = mincore(m.addr + uint64_t{idx[k]} * kPage, run * kPage, resident) == 0;
    for (size_t j = 0; j < run;) {
      size_t same = 1;
      bool in = known && (resident[j] & 1);
      while (j + same < run && (known && (resident[j + same] & 1)) == in) same++;
      if (!in || !CopyResidentRun(m, idx, k + j, same, out, zeroOut)) {
        if (zeroOut) std::memset(zeroOut + k + j, 0, same);
        if (!ReadFilesLocked(m, idx + k + j, same, out + (k + j) * kPage, err)) return false;
      }
      j += same;
    }
    k += run;
  }
  if (m.released.load()) return err.set("read", EBADF, "the region was released"), false;
  return true;
}

namespace {

// compareReadPathsAsync(region, pages: Uint32Array, run) -> Promise<Float64Array>: runs of `run`
// pages, read (checked and copied) alternately through the mapping (even runs) and through the
// files (odd runs); each run's time, ns, in order. Alternating, a moment of noise on this host
// falls on both alike; the caller compares medians, which a few preempted runs do not move.
// Pages should be distinct, populated and not read lately.
Napi::Value CompareReadPathsAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !Region::IsInstance(env, info[0]) || !info[1].IsTypedArray() || !info[2].IsNumber())
    throw Napi::TypeError::New(env, "compareReadPathsAsync(region, pages: Uint32Array, run: number)");
  Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
  if (!m) return env.Undefined();
  Napi::Uint32Array pages = info[1].As<Napi::Uint32Array>();
  std::vector<uint32_t> idx(pages.Data(), pages.Data() + pages.ElementLength());
  for (uint32_t x : idx)
    if (uint64_t{x} * kPage >= m->size) throw Napi::RangeError::New(env, "page index outside the region");
  const size_t run = info[2].As<Napi::Number>().Uint32Value();
  if (run == 0 || run > kRunPages) throw Napi::RangeError::New(env, "run must be 1.." + std::to_string(kRunPages) + " pages");
  InstallGuard();
  m->Ref();
  return Task<std::vector<double>>::Start(
      env,
      [m, idx, run](std::vector<double>& out, SysError& err) {
        std::vector<uint8_t> buf(kRunPages * kPage), zero(kRunPages);
        std::shared_lock<std::shared_mutex> lock(m->files);
        for (size_t at = 0, r = 0; at < idx.size() && !err.failed(); at += run, r++) {
          const size_t c = std::min(run, idx.size() - at);
          auto t0 = std::chrono::steady_clock::now();
          if (r % 2 == 0) {
            ReadInPlaceLocked(*m, idx.data() + at, c, buf.data(), zero.data(), err);
          } else if (ReadFilesLocked(*m, idx.data() + at, c, buf.data(), err)) {
            for (size_t k = 0; k < c; k++) zero[k] = IsZeroPage(buf.data() + k * kPage, kPage);
          }
          out.push_back(static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count()));
        }
        m->Unref();
      },
      [](Napi::Env e, std::vector<double>& r) -> Napi::Value {
        Napi::Float64Array a = Napi::Float64Array::New(e, r.size());
        for (size_t i = 0; i < r.size(); i++) a[i] = r[i];
        return a;
      },
      {info[0], info[1]});
}

// regionReadInPlace(region, on: boolean): reads of the region's pages go through its mapping
// (on) or through its files (off, the default)
Napi::Value RegionReadInPlace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !Region::IsInstance(env, info[0])) throw Napi::TypeError::New(env, "regionReadInPlace(region, on: boolean)");
  Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
  if (!m) return env.Undefined();
  bool on = info[1].ToBoolean().Value();
  if (on) InstallGuard();
  m->readsInPlace.store(on);
  return env.Undefined();
}

// regionWriteInPlace(region, on: boolean): a receiver's pages land in the region's mapping (on:
// the caller populated it for write) or go through its files (off, the default for 4 KiB shmem)
Napi::Value RegionWriteInPlace(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !Region::IsInstance(env, info[0])) throw Napi::TypeError::New(env, "regionWriteInPlace(region, on: boolean)");
  Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
  if (!m) return env.Undefined();
  m->writesInPlace.store(info[1].ToBoolean().Value());
  return env.Undefined();
}

}  // namespace

void InitReadPath(Napi::Env env, Napi::Object exports) {
  exports.Set("regionWriteInPlace", Napi::Function::New(env, RegionWriteInPlace));
  exports.Set("compareReadPathsAsync", Napi::Function::New(env, CompareReadPathsAsync));
  exports.Set("regionReadInPlace", Napi::Function::New(env, RegionReadInPlace));
}

}  // namespace livemig
