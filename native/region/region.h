// Region mechanism: a shared mapping of a memfd (created here or adopted), zero-copy views,
// and a release that can never turn a stale Buffer into a crash.
#pragma once

#include <napi.h>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <shared_mutex>
#include <vector>

namespace livemig {

// One mapping, shared by every Region object (main thread or worker) and every Buffer view
// that refers to it. The address range stays reserved until the last reference is gone, so
// views outlive release() safely; release() swaps the shared pages for private anonymous ones.
struct Mapping {
  uint8_t* addr = nullptr;
  size_t size = 0;
  int fd = -1;
  // a mapping of several pieces (a guest's regions back to back): their descriptors, fd is -1
  std::vector<int> pieceFds;
  // where each piece's bytes start in its file, and how many the mapping holds
  std::vector<uint64_t> pieceOffsets, pieceSizes;
  uint64_t id = 0;
  // shmem advised for transparent huge pages: reserving allocates through the mapping
  // (MADV_POPULATE_WRITE), since fallocate without a mapping would allocate 4 KiB pages
  bool thp = false;
  // on hugetlbfs: its files take no write(2), so pages are written through the mapping
  bool hugetlb = false;
  // the source reads pages through this mapping, populated, not its files (region/read_path.h)
  std::atomic<bool> readsInPlace{false};
  // the receiver writes pages into this mapping, populated for write beforehand, not its files
  std::atomic<bool> writesInPlace{false};
  // Held shared by whoever reads or writes the pages through the files (region/file_io.h), and
  // exclusively by the release while it closes them, so that no read lands in a closed (or
  // reused) descriptor.
  std::shared_mutex files;
  std::atomic<int> refs{1};
  std::atomic<bool> released{false};

  void Ref() { refs.fetch_add(1, std::memory_order_relaxed); }
  void Unref();
  // Returns false if it was already released.
  bool Release();
};

class Region : public Napi::ObjectWrap<Region> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit Region(const Napi::CallbackInfo& info);
  ~Region() override;

  // The live mapping, or nullptr (with a JS exception pending) when released.
  Mapping* LiveMapping(Napi::Env env);
  static Region* Unwrap(const Napi::Value& v) { return Napi::ObjectWrap<Region>::Unwrap(v.As<Napi::Object>()); }
  // Whether `v` is a NativeRegion (before Unwrap, where a caller's mistake must not crash).
  static bool IsInstance(Napi::Env env, const Napi::Value& v);

 private:
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  Napi::Value Reserve(const Napi::CallbackInfo& info);
  Napi::Value ReserveAsync(const Napi::CallbackInfo& info);
  Napi::Value Populate(const Napi::CallbackInfo& info);
  Napi::Value PopulateAsync(const Napi::CallbackInfo& info);
  Napi::Value DataExtentsAsync(const Napi::CallbackInfo& info);
  Napi::Value GetFd(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetId(const Napi::CallbackInfo& info);
  Napi::Value GetAddress(const Napi::CallbackInfo& info);
  Napi::Value GetReleased(const Napi::CallbackInfo& info);

  Mapping* mapping_ = nullptr;
};

void InitRegionStatics(Napi::Env env, Napi::Object exports);

}  // namespace livemig
