#include "region/region.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <mutex>
#include <thread>
#include <unordered_map>

#include "common.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

namespace livemig {

namespace {

// Every live mapping by id, so a worker thread (its own addon instance, same process) can
// attach to the very same virtual range: write tracking is per mapping, not per file.
std::mutex g_registry_mutex;
std::unordered_map<uint64_t, Mapping*> g_registry;
std::atomic<uint64_t> g_next_id{1};

struct RegionData {
  Napi::FunctionReference ctor;
};

bool OnHugetlbfs(const struct statfs& sf) { return static_cast<uint64_t>(sf.f_type) == HUGETLBFS_MAGIC; }

void Register(Mapping* m) {
  struct statfs sf;
  int probe = m->fd >= 0 ? m->fd : m->pieceFds.empty() ? -1 : m->pieceFds[0];
  m->hugetlb = probe >= 0 && fstatfs(probe, &sf) == 0 && OnHugetlbfs(sf);
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  g_registry[m->id] = m;
}

Napi::Object Wrap(Napi::Env env, Mapping* m) {
  auto* data = env.GetInstanceData<RegionData>();
  return data->ctor.New({Napi::External<Mapping>::New(env, m)});
}

// MFD_HUGETLB with the page size encoded as the kernel wants it (log2 << MFD_HUGE_SHIFT); 0: none
unsigned HugetlbFlags(uint64_t hugePageSize) {
  if (hugePageSize == 0) return 0;
  return MFD_HUGETLB | (static_cast<unsigned>(__builtin_ctzll(hugePageSize)) << 26);
}

bool AdviseHuge(Mapping* m, SysError* err) {
  if (madvise(m->addr, m->size, MADV_HUGEPAGE) != 0) {
    err->set("madvise(MADV_HUGEPAGE)", errno);
    return false;
  }
  m->thp = true;
  return true;
}

// Bytes [offset, offset+length) of the file allocated: fallocate, or for THP through the
// advised mapping (which also maps them), since fallocate has no mapping to take the huge page
// advice from. (hugetlbfs rounds a fallocate out to whole huge pages.)
bool AllocateRange(Mapping* m, uint64_t offset, uint64_t length, SysError* err) {
  if (m->thp) {
    if (madvise(m->addr + offset, length, MADV_POPULATE_WRITE) == 0) return true;
    err->set("madvise(MADV_POPULATE_WRITE)", errno);
    return false;
  }
  if (fallocate(m->fd, 0, static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) return true;
  err->set("fallocate", errno);
  return false;
}

bool AllocateAll(Mapping* m, SysError* err) { return AllocateRange(m, 0, m->size, err); }

Mapping* MapFd(int fd, size_t size, SysError* err) {
  void* addr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (addr == MAP_FAILED) {
    err->set("mmap", errno);
    return nullptr;
  }
  auto* m = new Mapping();
  m->addr = static_cast<uint8_t*>(addr);
  m->size = size;
  m->fd = fd;
  m->id = g_next_id.fetch_add(1);
  Register(m);
  return m;
}

// regionCreate(size, name, hugePageSize?, thp?): hugePageSize > 0 makes a hugetlbfs memfd of
// that page size (a power of two the kernel offers); thp advises the mapping for huge pages.
Napi::Value Create(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t size = static_cast<size_t>(ToU64(info[0]));
  std::string name = info[1].As<Napi::String>().Utf8Value();
  uint64_t hugePageSize = info.Length() > 2 && info[2].IsNumber() ? ToU64(info[2]) : 0;
  bool thp = info.Length() > 3 && info[3].ToBoolean().Value();
  int fd = static_cast<int>(syscall(SYS_memfd_create, name.c_str(), MFD_CLOEXEC | HugetlbFlags(hugePageSize)));
  if (fd < 0) throw MakeSysError(env, hugePageSize ? "memfd_create(MFD_HUGETLB)" : "memfd_create", errno);
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "ftruncate", e);
  }
  SysError err;
  Mapping* m = MapFd(fd, size, &err);
  if (!m) {
    close(fd);
    throw MakeSysError(env, err);
  }
  if (thp && !AdviseHuge(m, &err)) {
    m->Unref();  // the only reference: unmaps and closes
    throw MakeSysError(env, err);
  }
  return Wrap(env, m);
}

// Adopts a memfd/shm fd: the caller's fd is duplicated, so the caller keeps ownership of its own.
Napi::Value Adopt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int callerFd = info[0].As<Napi::Number>().Int32Value();
  size_t size = static_cast<size_t>(ToU64(info[1]));
  struct stat st;
  if (fstat(callerFd, &st) != 0) throw MakeSysError(env, "fstat", errno);
  if (static_cast<uint64_t>(st.st_size) < size) {
    throw MakeSysError(env, "fstat", EINVAL, "file holds " + std::to_string(st.st_size) + " bytes, fewer than the region's " + std::to_string(size));
  }
  int fd = fcntl(callerFd, F_DUPFD_CLOEXEC, 3);
  if (fd < 0) throw MakeSysError(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
  SysError err;
  Mapping* m = MapFd(fd, size, &err);
  if (!m) {
    close(fd);
    throw MakeSysError(env, err);
  }
  return Wrap(env, m);
}

// adoptPieces(pieces: [{fd, offset, size}]): one mapping of every piece back to back, each a
// duplicate of the caller's descriptor mapped at its offset (a guest's regions in one page space).
Napi::Value AdoptPieces(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array list = info[0].As<Napi::Array>();
  struct Piece {
    int fd;
    uint64_t offset, size;
  };
  std::vector<Piece> pieces;
  uint64_t total = 0;
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Object o = list.Get(i).As<Napi::Object>();
    Piece p{o.Get("fd").As<Napi::Number>().Int32Value(), ToU64(o.Get("offset")), ToU64(o.Get("size"))};
    struct stat st;
    if (fstat(p.fd, &st) != 0) throw MakeSysError(env, "fstat", errno);
    if (static_cast<uint64_t>(st.st_size) < p.offset + p.size) {
      throw MakeSysError(env, "fstat", EINVAL,
                         "piece " + std::to_string(i) + ": the file holds " + std::to_string(st.st_size) + " bytes, fewer than offset + size");
    }
    pieces.push_back(p);
    total += p.size;
  }
  if (pieces.empty() || total == 0) throw MakeSysError(env, "mmap", EINVAL, "no pieces");
  // the whole range first, so the pieces land side by side and nothing else in between
  void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (base == MAP_FAILED) throw MakeSysError(env, "mmap", errno, "reserving the range");
  auto* m = new Mapping();
  m->addr = static_cast<uint8_t*>(base);
  m->size = total;
  uint64_t at = 0;
  for (const Piece& p : pieces) {
    int fd = fcntl(p.fd, F_DUPFD_CLOEXEC, 3);
    // a piece opened for reading only (a source's disk image) is mapped for reading only
    const int access = fd < 0 ? -1 : fcntl(fd, F_GETFL) & O_ACCMODE;
    const int prot = access == O_RDONLY ? PROT_READ : PROT_READ | PROT_WRITE;
    void* a = fd < 0 ? MAP_FAILED : mmap(m->addr + at, p.size, prot, MAP_SHARED | MAP_FIXED, fd, static_cast<off_t>(p.offset));
    if (a == MAP_FAILED) {
      int e = errno;
      if (fd >= 0) close(fd);
      for (int f : m->pieceFds) close(f);
      munmap(base, total);
      delete m;
      throw MakeSysError(env, fd < 0 ? "fcntl(F_DUPFD_CLOEXEC)" : "mmap", e);
    }
    m->pieceFds.push_back(fd);
    m->pieceOffsets.push_back(p.offset);
    m->pieceSizes.push_back(p.size);
    at += p.size;
  }
  m->id = g_next_id.fetch_add(1);
  Register(m);
  return Wrap(env, m);
}

// regionPieces(region) -> [{fd, offset, size}]: the files the mapping is of, in order (one when it
// is a single file); the descriptors are the region's, valid until it is released
Napi::Value RegionPieces(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !Region::IsInstance(env, info[0])) throw Napi::TypeError::New(env, "regionPieces(region)");
  Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
  Napi::Array out = Napi::Array::New(env);
  if (!m) return out;
  auto piece = [&](int fd, uint64_t offset, uint64_t size) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("fd", fd);
    o.Set("offset", static_cast<double>(offset));
    o.Set("size", static_cast<double>(size));
    out.Set(out.Length(), o);
  };
  if (m->pieceFds.empty()) piece(m->fd, 0, m->size);
  for (size_t i = 0; i < m->pieceFds.size(); i++) piece(m->pieceFds[i], m->pieceOffsets[i], m->pieceSizes[i]);
  return out;
}

// fileBacking(fd): {hugetlb, blockSize}: whether the file is on hugetlbfs, and its page size
// there (fstatfs's f_bsize is the huge page size on hugetlbfs)
Napi::Value FileBacking(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  struct statfs sf;
  if (fstatfs(info[0].As<Napi::Number>().Int32Value(), &sf) != 0) throw MakeSysError(env, "fstatfs", errno);
  Napi::Object o = Napi::Object::New(env);
  o.Set("hugetlb", Napi::Boolean::New(env, OnHugetlbfs(sf)));
  o.Set("blockSize", Napi::Number::New(env, static_cast<double>(sf.f_bsize)));
  return o;
}

Napi::Value Attach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t id = ToU64(info[0]);
  Mapping* m = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    auto it = g_registry.find(id);
    if (it != g_registry.end() && !it->second->released.load()) {
      m = it->second;
      m->Ref();
    }
  }
  if (!m) return env.Null();
  return Wrap(env, m);
}

constexpr uint64_t kPage = 4096;

// Appends the data runs of bytes [offset, offset + size) of fd, as page pairs from `at` in the
// mapping's page space, merging a run that continues the previous one.
void ScanDataExtents(int fd, uint64_t offset, uint64_t size, uint64_t at, std::vector<uint64_t>* out, SysError* err) {
  const uint64_t end = offset + size;
  uint64_t pos = offset;
  while (pos < end) {
    off_t data = lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno != ENXIO) err->set("lseek(SEEK_DATA)", errno);
      return;  // ENXIO: no data past pos
    }
    if (static_cast<uint64_t>(data) >= end) return;
    off_t hole = lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return err->set("lseek(SEEK_HOLE)", errno);
    uint64_t first = (at + (static_cast<uint64_t>(data) - offset)) / kPage;
    uint64_t stop = (at + (std::min(static_cast<uint64_t>(hole), end) - offset) + kPage - 1) / kPage;
    if (!out->empty() && out->back() >= first) {
      out->back() = std::max(out->back(), stop);
    } else {
      out->push_back(first);
      out->push_back(stop);
    }
    pos = static_cast<uint64_t>(hole);
  }
}

// Page pairs [first, end) from JS, each inside the region and in order.
bool ExtentsFrom(const Napi::Value& v, uint64_t pages, std::vector<std::pair<uint64_t, uint64_t>>* out) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) return false;
  Napi::Float64Array a = v.As<Napi::Float64Array>();
  if (a.ElementLength() % 2 != 0) return false;
  uint64_t last = 0;
  for (size_t i = 0; i < a.ElementLength(); i += 2) {
    double f = a[i], e = a[i + 1];
    if (!(f >= static_cast<double>(last)) || !(e > f) || !(e <= static_cast<double>(pages)) || f != static_cast<double>(static_cast<uint64_t>(f)) ||
        e != static_cast<double>(static_cast<uint64_t>(e)))
      return false;
    out->emplace_back(static_cast<uint64_t>(f), static_cast<uint64_t>(e));
    last = static_cast<uint64_t>(e);
  }
  return true;
}

// The page runs argument i names (checked), or the whole region when it is absent.
std::vector<std::pair<uint64_t, uint64_t>> RunsArg(const Napi::CallbackInfo& info, size_t i, uint64_t pages, const char* name) {
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  if (info.Length() <= i || info[i].IsUndefined()) {
    runs.emplace_back(0, pages);
  } else if (!ExtentsFrom(info[i], pages, &runs)) {
    throw Napi::RangeError::New(info.Env(), std::string(name) + ": a Float64Array of [first, end) page pairs inside the region");
  }
  return runs;
}

Napi::Value PageSize(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(sysconf(_SC_PAGESIZE))); }

}  // namespace

void Mapping::Unref() {
  if (refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    g_registry.erase(id);
  }
  if (!released.load()) {
    if (fd >= 0) close(fd);  // never released explicitly: the last reference is going now
    for (int f : pieceFds) close(f);
  }
  munmap(addr, size);
  delete this;
}

bool Mapping::Release() {
  bool expected = false;
  if (!released.compare_exchange_strong(expected, true)) return false;
  // Replace the shared pages with private anonymous memory at the same address: any Buffer
  // view still alive then sees harmless scratch memory instead of faulting, and the memfd's
  // pages are freed once its last mapping and descriptor are gone. Tearing down a populated
  // gigabyte takes ~100 ms, so it runs on its own thread, holding a reference so the range
  // cannot be unmapped (and reused) under it.
  Ref();
  std::thread([this] {
    void* r = mmap(addr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
    (void)r;  // on failure the shared mapping stays until munmap; still no crash
    std::unique_lock<std::shared_mutex> lock(files);
    if (fd >= 0) close(fd);
    fd = -1;
    for (int f : pieceFds) close(f);
    pieceFds.clear();
    pieceOffsets.clear();
    pieceSizes.clear();
    Unref();
  }).detach();
  return true;
}

Napi::Function Region::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "NativeRegion",
                                    {
                                        InstanceMethod("view", &Region::View),
                                        InstanceMethod("release", &Region::Release),
                                        InstanceMethod("reserve", &Region::Reserve),
                                        InstanceMethod("populate", &Region::Populate),
                                        InstanceMethod("populateAsync", &Region::PopulateAsync),
                                        InstanceMethod("dataExtentsAsync", &Region::DataExtentsAsync),
                                        InstanceMethod("reserveAsync", &Region::ReserveAsync),
                                        InstanceAccessor("fd", &Region::GetFd, nullptr),
                                        InstanceAccessor("size", &Region::GetSize, nullptr),
                                        InstanceAccessor("id", &Region::GetId, nullptr),
                                        InstanceAccessor("address", &Region::GetAddress, nullptr),
                                        InstanceAccessor("released", &Region::GetReleased, nullptr),
                                    });
  auto* data = new RegionData();
  data->ctor = Napi::Persistent(ctor);
  env.SetInstanceData<RegionData>(data);
  return ctor;
}

bool Region::IsInstance(Napi::Env env, const Napi::Value& v) {
  auto* data = env.GetInstanceData<RegionData>();
  return data != nullptr && v.IsObject() && v.As<Napi::Object>().InstanceOf(data->ctor.Value());
}

Region::Region(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Region>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    Napi::TypeError::New(info.Env(), "NativeRegion is created by regionCreate/regionAdopt/regionAttach").ThrowAsJavaScriptException();
    return;
  }
  mapping_ = info[0].As<Napi::External<Mapping>>().Data();
}

Region::~Region() {
  if (mapping_) mapping_->Unref();
}

Mapping* Region::LiveMapping(Napi::Env env) {
  if (!mapping_ || mapping_->released.load()) {
    Napi::Error err = Napi::Error::New(env, "region has been released");
    err.Set("released", Napi::Boolean::New(env, true));
    err.ThrowAsJavaScriptException();
    return nullptr;
  }
  return mapping_;
}

Napi::Value Region::View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = LiveMapping(env);
  if (!m) return env.Undefined();
  uint64_t offset = ToU64(info[0]);
  uint64_t length = ToU64(info[1]);
  if (offset > m->size || length > m->size - offset) {
    Napi::RangeError::New(env, "view outside the region").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  m->Ref();
  return Napi::Buffer<uint8_t>::New(
      env, m->addr + offset, static_cast<size_t>(length), [](Napi::Env, uint8_t*, Mapping* mm) { mm->Unref(); }, m);
}

Napi::Value Region::Release(const Napi::CallbackInfo& info) {
  bool did = mapping_ && mapping_->Release();
  return Napi::Boolean::New(info.Env(), did);
}

// Allocates every page of the backing file now, so a destination refuses up front
// (ENOSPC/ENOMEM) instead of dying of SIGBUS in the middle of a migration.
Napi::Value Region::Reserve(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = LiveMapping(env);
  if (!m) return env.Undefined();
  SysError err;
  if (!AllocateAll(m, &err)) throw MakeSysError(env, err);
  return env.Undefined();
}

// reserveAsync(extents?): the same on a pool thread. Allocating a large region is kernel work of
// hundreds of milliseconds per GiB on a VM host, which must not stall a listener's event loop
// (other connections, RESOLVE answers, deadlines). With extents ([firstPage, endPage, ...]),
// only those pages: the rest of a fresh region reads as zero without being allocated.
Napi::Value Region::ReserveAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = LiveMapping(env);
  if (!m) return env.Undefined();
  if (m->fd < 0) throw Napi::Error::New(env, "a mapping of several pieces is not reserved here");
  std::vector<std::pair<uint64_t, uint64_t>> ranges = RunsArg(info, 0, m->size / kPage, "extents");
  m->Ref();
  return Task<int>::Start(
      env,
      [m, ranges](int&, SysError& err) {
        for (const auto& [first, end] : ranges) {
          if (!AllocateRange(m, first * kPage, (end - first) * kPage, &err)) break;
        }
        m->Unref();
      },
      [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); }, {info.This()});
}

// Maps every page into this process's page tables so later writes run at memory speed.
Napi::Value Region::Populate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = LiveMapping(env);
  if (!m) return env.Undefined();
  if (madvise(m->addr, m->size, MADV_POPULATE_WRITE) != 0) throw MakeSysError(env, "madvise(MADV_POPULATE_WRITE)", errno);
  return env.Undefined();
}

// The same, on the thread pool: reserving 1 GiB takes seconds on a VM host and must not
// stall the event loop (the handshake goes on meanwhile).
// populateAsync(forWrite, extents?: Float64Array [firstPage, endPage, ...]): only those pages
// when given: a read of a hole in a shared memfd allocates it, and a guest's untouched memory
// must not grow on this host because livemig looked at it.
Napi::Value Region::PopulateAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = LiveMapping(env);
  if (!m) return env.Undefined();
  // read: map the pages the file already holds (a sender reading a guest's memory);
  // write: also allocate missing ones (a receiver preparing to be written)
  bool forWrite = info.Length() == 0 || info[0].ToBoolean().Value();
  std::vector<std::pair<uint64_t, uint64_t>> ranges = RunsArg(info, 1, m->size / kPage, "extents");
  m->Ref();
  return Task<int>::Start(
      env,
      [m, forWrite, ranges](int&, SysError& err) {
        for (const auto& [first, end] : ranges) {
          if (madvise(m->addr + first * kPage, (end - first) * kPage, forWrite ? MADV_POPULATE_WRITE : MADV_POPULATE_READ) != 0) {
            err.set(forWrite ? "madvise(MADV_POPULATE_WRITE)" : "madvise(MADV_POPULATE_READ)", errno);
            break;
          }
        }
        m->Unref();
      },
      [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); }, {info.This()});
}

// dataExtentsAsync(within?: Float64Array, now?: boolean) -> Float64Array [firstPage, endPage,
// ...]: the pages whose backing file holds data (only inside `within`'s page runs, when given),
// in order, adjacent runs merged. Asked of the file (lseek SEEK_DATA/SEEK_HOLE), not of the
// memory: nothing is mapped, read or allocated, so a hole stays a hole. `now`: on this thread
// (inside a guest's pause, a few runs cost less than a pool thread's wake-up).
Napi::Value Region::DataExtentsAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = LiveMapping(env);
  if (!m) return env.Undefined();
  std::vector<std::pair<uint64_t, uint64_t>> within = RunsArg(info, 0, m->size / kPage, "within");
  bool now = info.Length() > 1 && info[1].ToBoolean().Value();
  m->Ref();
  auto work = [m, within](std::vector<uint64_t>& out, SysError& err) {
    for (const auto& [first, end] : within) {
      const uint64_t lo = first * kPage, hi = end * kPage;
      if (m->pieceFds.empty()) {
        ScanDataExtents(m->fd, lo, hi - lo, lo, &out, &err);
        continue;
      }
      uint64_t at = 0;  // where piece i starts in the mapping
      for (size_t i = 0; i < m->pieceFds.size() && !err.failed(); at += m->pieceSizes[i], i++) {
        uint64_t from = std::max(lo, at), to = std::min(hi, at + m->pieceSizes[i]);
        if (from < to) ScanDataExtents(m->pieceFds[i], m->pieceOffsets[i] + (from - at), to - from, from, &out, &err);
      }
    }
    m->Unref();
  };
  auto done = [](Napi::Env e, std::vector<uint64_t>& out) -> Napi::Value {
    Napi::Float64Array a = Napi::Float64Array::New(e, out.size());
    for (size_t i = 0; i < out.size(); i++) a[i] = static_cast<double>(out[i]);
    return a;
  };
  return now ? Task<std::vector<uint64_t>>::RunNow(env, work, done) : Task<std::vector<uint64_t>>::Start(env, work, done, {info.This()});
}

Napi::Value Region::GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), mapping_ ? mapping_->fd : -1); }
Napi::Value Region::GetSize(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), mapping_ ? static_cast<double>(mapping_->size) : 0); }
Napi::Value Region::GetId(const Napi::CallbackInfo& info) { return Napi::BigInt::New(info.Env(), mapping_ ? mapping_->id : 0); }
Napi::Value Region::GetAddress(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), mapping_ ? reinterpret_cast<uint64_t>(mapping_->addr) : 0);
}
Napi::Value Region::GetReleased(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !mapping_ || mapping_->released.load()); }

void InitRegionStatics(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeRegion", Region::Init(env));
  exports.Set("regionCreate", Napi::Function::New(env, Create));
  exports.Set("regionAdopt", Napi::Function::New(env, Adopt));
  exports.Set("regionAdoptPieces", Napi::Function::New(env, AdoptPieces));
  exports.Set("regionPieces", Napi::Function::New(env, RegionPieces));
  exports.Set("regionAttach", Napi::Function::New(env, Attach));
  exports.Set("fileBacking", Napi::Function::New(env, FileBacking));
  exports.Set("pageSize", Napi::Function::New(env, PageSize));
}

}  // namespace livemig
