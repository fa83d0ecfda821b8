// Dirty-page tracking mechanisms: userfaultfd write-protect in async mode + PAGEMAP_SCAN,
// and soft-dirty (clear_refs + pagemap bit 55). Which one to use is decided in TypeScript.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.h"
#include "region/region.h"
#include "tracking/tracking.h"

// Debian 12's kernel headers predate these (Linux 6.7); values from the kernel's uapi
// documentation (Documentation/admin-guide/mm/userfaultfd.rst, pagemap.rst).
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#ifndef PAGEMAP_SCAN
struct page_region {
  uint64_t start;
  uint64_t end;
  uint64_t categories;
};
struct pm_scan_arg {
  uint64_t size;
  uint64_t flags;
  uint64_t start;
  uint64_t end;
  uint64_t walk_end;
  uint64_t vec;
  uint64_t vec_len;
  uint64_t max_pages;
  uint64_t category_inverted;
  uint64_t category_mask;
  uint64_t category_anyof_mask;
  uint64_t return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

namespace livemig {

// A new userfaultfd: the syscall first, then /dev/userfaultfd (allowed for its file's owner
// group even when vm.unprivileged_userfaultfd is 0).
int OpenUffd(SysError* err) {
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  if (fd >= 0) return fd;
  int first = errno;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    int e = errno;
    close(dev);
    if (fd >= 0) return fd;
    err->set("ioctl(USERFAULTFD_IOC_NEW)", e);
    return -1;
  }
  err->set("userfaultfd", first);
  return -1;
}

namespace {

constexpr uint64_t kPagemapSoftDirtyBit = 1ULL << 55;

// The features this kernel offers (UFFDIO_API with none requested reports them all).
Napi::Value UffdProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SysError err;
  int fd = OpenUffd(&err);
  if (fd < 0) throw MakeSysError(env, err);
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = 0;
  int r = ioctl(fd, UFFDIO_API, &api);
  int e = errno;
  close(fd);
  if (r != 0) throw MakeSysError(env, "ioctl(UFFDIO_API)", e);
  return Napi::BigInt::New(env, static_cast<uint64_t>(api.features));
}

// Registers [address, address+length) of *this* process for async write-protect tracking
// and protects it. Returns the userfaultfd, which must stay open while tracking lasts
// (closing it unregisters the range). A guest process calls this on its own memory.
Napi::Value UffdWriteProtect(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t address = ToU64(info[0]);
  uint64_t length = ToU64(info[1]);
  uint64_t features = ToU64(info[2]);
  SysError err;
  int fd = OpenUffd(&err);
  if (fd < 0) throw MakeSysError(env, err);
  struct uffdio_api api = {};
  api.api = UFFD_API;
  api.features = features;
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(
        env, "ioctl(UFFDIO_API)", e, "features requested 0x" + [&] {
          char b[32];
          snprintf(b, sizeof b, "%llx", static_cast<unsigned long long>(features));
          return std::string(b);
        }());
  }
  struct uffdio_register reg = {};
  reg.range.start = address;
  reg.range.len = length;
  reg.mode = UFFDIO_REGISTER_MODE_WP;
  if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "ioctl(UFFDIO_REGISTER)", e);
  }
  struct uffdio_writeprotect wp = {};
  wp.range.start = address;
  wp.range.len = length;
  wp.mode = UFFDIO_WRITEPROTECT_MODE_WP;
  if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) != 0) {
    int e = errno;
    close(fd);
    throw MakeSysError(env, "ioctl(UFFDIO_WRITEPROTECT)", e);
  }
  return Napi::Number::New(env, fd);
}

}  // namespace

// Pages written in [start, end) since they were last protected, as page indices relative to
// `start`; with `rearm`, the kernel write-protects exactly those pages again in the same walk,
// so a write that lands after the walk passed a page is caught by the next scan.
void ScanWritten(int pagemapFd, uint64_t start, uint64_t end, uint64_t pageSize, bool rearm, std::vector<uint32_t>* out, SysError* err) {
  // Enough for the common case in one call; the loop continues from walk_end otherwise.
  static thread_local std::vector<page_region> vec(32768);
  struct pm_scan_arg arg = {};
  arg.size = sizeof(arg);
  arg.flags = PM_SCAN_CHECK_WPASYNC | (rearm ? PM_SCAN_WP_MATCHING : 0);
  arg.end = end;
  arg.vec = reinterpret_cast<uint64_t>(vec.data());
  arg.vec_len = vec.size();
  arg.category_mask = PAGE_IS_WRITTEN;
  arg.return_mask = PAGE_IS_WRITTEN;
  uint64_t cursor = start;
  // A call that stops early (vec full) may set walk_end before the end of the last region it
  // returned (seen with 256 MiB/s of scattered writes): the next call starts there and may
  // return pages again, some of them written since (new). Keep them all; if that happened,
  // sort and drop the repeats at the end, so the output stays ascending with each page once.
  uint64_t reported = start;
  size_t base = out->size();
  bool overlapped = false;
  while (cursor < end) {
    arg.start = cursor;
    arg.walk_end = 0;
    int n = ioctl(pagemapFd, PAGEMAP_SCAN, &arg);
    if (n < 0) {
      // EPERM here means a page without async write-protect (PM_SCAN_CHECK_WPASYNC): the range
      // is not (or no longer) registered. EINVAL means the kernel lacks PAGEMAP_SCAN flags we use.
      err->set("ioctl(PAGEMAP_SCAN)", errno);
      return;
    }
    for (int i = 0; i < n; i++) {
      if (vec[i].start < reported) overlapped = true;
      uint64_t first = (vec[i].start - start) / pageSize;
      uint64_t last = (vec[i].end - start) / pageSize;
      for (uint64_t p = first; p < last; p++) out->push_back(static_cast<uint32_t>(p));
      reported = std::max<uint64_t>(reported, vec[i].end);
    }
    if (arg.walk_end <= cursor) {
      err->set("ioctl(PAGEMAP_SCAN)", EIO, "scan made no progress");
      return;
    }
    cursor = arg.walk_end;
  }
  if (overlapped) {
    std::sort(out->begin() + base, out->end());
    out->erase(std::unique(out->begin() + base, out->end()), out->end());
  }
}

namespace {

int OpenProcFile(int pid, const char* name, int flags, SysError* err) {
  std::string path = pid == 0 ? std::string("/proc/self/") + name : "/proc/" + std::to_string(pid) + "/" + name;
  int fd = open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) err->set("open", errno, path);
  return fd;
}

Napi::Value PagemapOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SysError err;
  int fd = OpenProcFile(info[0].As<Napi::Number>().Int32Value(), "pagemap", O_RDONLY, &err);
  if (fd < 0) throw MakeSysError(env, err);
  return Napi::Number::New(env, fd);
}

struct ScanArgs {
  int fd;
  uint64_t start, end, pageSize;
  bool rearm;
};

ScanArgs ReadScanArgs(const Napi::CallbackInfo& info) {
  ScanArgs a;
  a.fd = info[0].As<Napi::Number>().Int32Value();
  a.start = ToU64(info[1]);
  a.end = a.start + ToU64(info[2]);
  a.pageSize = ToU64(info[3]);
  a.rearm = info[4].ToBoolean().Value();
  return a;
}

Napi::Value PagemapScanSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ScanArgs a = ReadScanArgs(info);
  std::vector<uint32_t> pages;
  SysError err;
  ScanWritten(a.fd, a.start, a.end, a.pageSize, a.rearm, &pages, &err);
  if (err.failed()) throw MakeSysError(env, err);
  return PagesToJs(env, std::move(pages));
}

Napi::Value PagemapScan(const Napi::CallbackInfo& info) {
  ScanArgs a = ReadScanArgs(info);
  return Task<std::vector<uint32_t>>::Start(
      info.Env(), [a](std::vector<uint32_t>& pages, SysError& err) { ScanWritten(a.fd, a.start, a.end, a.pageSize, a.rearm, &pages, &err); },
      [](Napi::Env env, std::vector<uint32_t>& pages) -> Napi::Value { return PagesToJs(env, std::move(pages)); });
}

// Soft-dirty: writing "4" to clear_refs clears the bit for the whole process.
Napi::Value SoftDirtyClear(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SysError err;
  int fd = OpenProcFile(info[0].As<Napi::Number>().Int32Value(), "clear_refs", O_WRONLY, &err);
  if (fd < 0) throw MakeSysError(env, err);
  ssize_t w = write(fd, "4", 1);
  int e = errno;
  close(fd);
  if (w != 1) throw MakeSysError(env, "write(clear_refs)", e);
  return env.Undefined();
}

void ScanSoftDirty(int pagemapFd, uint64_t start, uint64_t end, uint64_t pageSize, std::vector<uint32_t>* out, SysError* err) {
  constexpr size_t kChunk = 65536;
  std::vector<uint64_t> entries(kChunk);
  uint64_t pages = (end - start) / pageSize;
  for (uint64_t done = 0; done < pages;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, pages - done));
    off_t off = static_cast<off_t>((start / pageSize + done) * sizeof(uint64_t));
    ssize_t r = pread(pagemapFd, entries.data(), n * sizeof(uint64_t), off);
    if (r < 0) {
      err->set("pread(pagemap)", errno);
      return;
    }
    size_t got = static_cast<size_t>(r) / sizeof(uint64_t);
    if (got == 0) {
      err->set("pread(pagemap)", EIO, "short read");
      return;
    }
    for (size_t i = 0; i < got; i++) {
      if (entries[i] & kPagemapSoftDirtyBit) out->push_back(static_cast<uint32_t>(done + i));
    }
    done += got;
  }
}

Napi::Value SoftDirtyScan(const Napi::CallbackInfo& info) {
  ScanArgs a = ReadScanArgs(info);
  return Task<std::vector<uint32_t>>::Start(
      info.Env(), [a](std::vector<uint32_t>& pages, SysError& err) { ScanSoftDirty(a.fd, a.start, a.end, a.pageSize, &pages, &err); },
      [](Napi::Env env, std::vector<uint32_t>& pages) -> Napi::Value { return PagesToJs(env, std::move(pages)); });
}

// Whether this kernel keeps soft-dirty bits: write one fresh page after clear_refs and look
// for bit 55. Kernels built without CONFIG_MEM_SOFT_DIRTY accept clear_refs but never set it.
Napi::Value SoftDirtyProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  long pageSize = sysconf(_SC_PAGESIZE);
  void* p = mmap(nullptr, pageSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw MakeSysError(env, "mmap", errno);
  static_cast<volatile char*>(p)[0] = 1;
  SysError err;
  int cr = OpenProcFile(0, "clear_refs", O_WRONLY, &err);
  bool ok = false;
  if (cr >= 0) {
    if (write(cr, "4", 1) != 1) err.set("write(clear_refs)", errno);
    close(cr);
  }
  if (!err.failed()) {
    static_cast<volatile char*>(p)[0] = 2;
    int pm = OpenProcFile(0, "pagemap", O_RDONLY, &err);
    if (pm >= 0) {
      uint64_t entry = 0;
      off_t off = static_cast<off_t>(reinterpret_cast<uint64_t>(p) / pageSize * sizeof(uint64_t));
      if (pread(pm, &entry, sizeof entry, off) != sizeof entry) err.set("pread(pagemap)", errno);
      ok = (entry & kPagemapSoftDirtyBit) != 0;
      close(pm);
    }
  }
  munmap(p, pageSize);
  if (err.failed()) throw MakeSysError(env, err);
  return Napi::Boolean::New(env, ok);
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  // EINTR on close still releases the descriptor on Linux; nothing to retry.
  if (fd >= 0 && close(fd) != 0 && errno != EINTR) throw MakeSysError(info.Env(), "close", errno);
  return info.Env().Undefined();
}

}  // namespace

void InitTracking(Napi::Env env, Napi::Object exports) {
  exports.Set("uffdProbe", Napi::Function::New(env, UffdProbe));
  exports.Set("uffdWriteProtect", Napi::Function::New(env, UffdWriteProtect));
  exports.Set("pagemapOpen", Napi::Function::New(env, PagemapOpen));
  exports.Set("pagemapScanSync", Napi::Function::New(env, PagemapScanSync));
  exports.Set("pagemapScan", Napi::Function::New(env, PagemapScan));
  exports.Set("softDirtyClear", Napi::Function::New(env, SoftDirtyClear));
  exports.Set("softDirtyScan", Napi::Function::New(env, SoftDirtyScan));
  exports.Set("softDirtyProbe", Napi::Function::New(env, SoftDirtyProbe));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd));
  exports.Set("UFFD_FEATURE_WP_ASYNC", Napi::BigInt::New(env, static_cast<uint64_t>(UFFD_FEATURE_WP_ASYNC)));
  exports.Set("UFFD_FEATURE_WP_UNPOPULATED", Napi::BigInt::New(env, static_cast<uint64_t>(UFFD_FEATURE_WP_UNPOPULATED)));
  exports.Set("UFFD_FEATURE_WP_HUGETLBFS_SHMEM", Napi::BigInt::New(env, static_cast<uint64_t>(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)));
}

}  // namespace livemig
