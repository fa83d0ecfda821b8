// Disk image mechanisms JavaScript cannot reach (policy in src/disk/): cloning a file's extents
// (FICLONE, a reflink on XFS and btrfs), asking where its extents lie (FIEMAP, after the
// filesystem has written back what is dirty), and hashing its blocks as they read now.
#include <errno.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "codec/pagehash.h"
#include "common.h"

namespace livemig {

namespace {

int FdArg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a file descriptor");
  int fd = info[i].As<Napi::Number>().Int32Value();
  if (fd < 0) throw Napi::RangeError::New(info.Env(), std::string(what) + " must be a file descriptor");
  return fd;
}

// fileCloneAsync(src, dst): dst becomes a clone of src, sharing its extents (ioctl FICLONE). The
// filesystem writes src's dirty pages back first, so the clone holds every completed write.
Napi::Value FileCloneAsync(const Napi::CallbackInfo& info) {
  int src = FdArg(info, 0, "src"), dst = FdArg(info, 1, "dst");
  return Task<int>::Start(
      info.Env(),
      [src, dst](int&, SysError& err) {
        if (ioctl(dst, FICLONE, src) != 0) err.set("ioctl(FICLONE)", errno);
      },
      [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); });
}

// fileExtentsAsync(fd) -> Float64Array [logical, physical, length, flags, ...] in bytes, every
// extent of the file in order, after a write-back of its dirty pages (FIEMAP_FLAG_SYNC): a
// write that completed before the call is where this says.
Napi::Value FileExtentsAsync(const Napi::CallbackInfo& info) {
  int fd = FdArg(info, 0, "fd");
  return Task<std::vector<double>>::Start(
      info.Env(),
      [fd](std::vector<double>& out, SysError& err) {
        constexpr unsigned kBatch = 512;
        std::vector<uint8_t> buf(sizeof(fiemap) + kBatch * sizeof(fiemap_extent));
        auto* fm = reinterpret_cast<fiemap*>(buf.data());
        uint64_t start = 0;
        unsigned flags = FIEMAP_FLAG_SYNC;
        for (;;) {
          std::memset(buf.data(), 0, buf.size());
          fm->fm_start = start;
          fm->fm_length = FIEMAP_MAX_OFFSET - start;
          fm->fm_flags = flags;
          fm->fm_extent_count = kBatch;
          if (ioctl(fd, FS_IOC_FIEMAP, fm) != 0) return err.set("ioctl(FS_IOC_FIEMAP)", errno);
          flags = 0;  // synced once; the rest of the walk reads the same state
          if (fm->fm_mapped_extents == 0) return;
          bool last = false;
          for (unsigned i = 0; i < fm->fm_mapped_extents; i++) {
            const fiemap_extent& e = fm->fm_extents[i];
            out.insert(out.end(), {static_cast<double>(e.fe_logical), static_cast<double>(e.fe_physical), static_cast<double>(e.fe_length),
                                   static_cast<double>(e.fe_flags)});
            start = e.fe_logical + e.fe_length;
            last = last || (e.fe_flags & FIEMAP_EXTENT_LAST);
          }
          if (last || fm->fm_mapped_extents < kBatch) return;
        }
      },
      [](Napi::Env e, std::vector<double>& v) -> Napi::Value {
        Napi::Float64Array a = Napi::Float64Array::New(e, v.size());
        if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(double));
        return a;
      });
}

// hashFileBlocksAsync(fd, blockSize, firstBlock, count) -> BigUint64Array: the page hash
// (codec/pagehash.h) of each block as pread reads it now; a block past the end of the file
// reads as zeros. blockSize: a power of two from 4096 to 1 MiB.
Napi::Value HashFileBlocksAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0, "fd");
  if (info.Length() < 4 || !info[1].IsNumber() || !info[2].IsNumber() || !info[3].IsNumber())
    throw Napi::TypeError::New(env, "hashFileBlocksAsync(fd, blockSize, firstBlock, count)");
  const uint64_t bs = static_cast<uint64_t>(info[1].As<Napi::Number>().Int64Value());
  const int64_t first = info[2].As<Napi::Number>().Int64Value(), count = info[3].As<Napi::Number>().Int64Value();
  if (bs < 4096 || bs > (1u << 20) || (bs & (bs - 1)) != 0) throw Napi::RangeError::New(env, "blockSize must be a power of two from 4096 to 1 MiB");
  if (first < 0 || count < 0 || count > (int64_t{1} << 28)) throw Napi::RangeError::New(env, "firstBlock and count must be non-negative (count at most 2^28)");
  return Task<std::vector<uint64_t>>::Start(
      env,
      [fd, bs, first, count](std::vector<uint64_t>& out, SysError& err) {
        constexpr uint64_t kRead = 1u << 20;
        const uint64_t per = kRead / bs > 0 ? kRead / bs : 1;
        std::vector<uint8_t> buf(per * bs);
        out.resize(static_cast<size_t>(count));
        for (int64_t b = 0; b < count;) {
          const uint64_t n = std::min<uint64_t>(per, static_cast<uint64_t>(count - b));
          const uint64_t want = n * bs;
          uint64_t got = 0;
          while (got < want) {
            ssize_t r = pread(fd, buf.data() + got, want - got, static_cast<off_t>((static_cast<uint64_t>(first + b)) * bs + got));
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) return err.set("pread", errno);
            if (r == 0) break;
            got += static_cast<uint64_t>(r);
          }
          std::memset(buf.data() + got, 0, want - got);
          for (uint64_t k = 0; k < n; k++) out[static_cast<size_t>(b) + k] = PageHash(buf.data() + k * bs, bs);
          b += static_cast<int64_t>(n);
        }
      },
      [](Napi::Env e, std::vector<uint64_t>& v) -> Napi::Value {
        Napi::BigUint64Array a = Napi::BigUint64Array::New(e, v.size());
        if (!v.empty()) std::memcpy(a.Data(), v.data(), v.size() * sizeof(uint64_t));
        return a;
      });
}

// fileAllocateAsync(fd, ranges: Float64Array [offset, length, ...]): the ranges allocated in the
// file (fallocate, size kept), so that writing them later changes no block map
Napi::Value FileAllocateAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0, "fd");
  if (info.Length() < 2 || !info[1].IsTypedArray()) throw Napi::TypeError::New(env, "fileAllocateAsync(fd, ranges: Float64Array)");
  Napi::Float64Array r = info[1].As<Napi::Float64Array>();
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (size_t i = 0; i + 1 < r.ElementLength(); i += 2) ranges.emplace_back(static_cast<int64_t>(r[i]), static_cast<int64_t>(r[i + 1]));
  return Task<int>::Start(
      env,
      [fd, ranges](int&, SysError& err) {
        for (const auto& [at, len] : ranges) {
          if (len > 0 && fallocate(fd, FALLOC_FL_KEEP_SIZE, at, len) != 0) return err.set("fallocate", errno);
        }
      },
      [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); });
}

}  // namespace

void InitDisk(Napi::Env env, Napi::Object exports) {
  exports.Set("fileCloneAsync", Napi::Function::New(env, FileCloneAsync));
  exports.Set("fileExtentsAsync", Napi::Function::New(env, FileExtentsAsync));
  exports.Set("hashFileBlocksAsync", Napi::Function::New(env, HashFileBlocksAsync));
  exports.Set("fileAllocateAsync", Napi::Function::New(env, FileAllocateAsync));
}

}  // namespace livemig
