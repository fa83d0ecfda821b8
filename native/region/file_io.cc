// Page reads and writes through the region's files (see file_io.h).
#include "region/file_io.h"

#include "region/read_path.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/magic.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace livemig {

namespace {

constexpr uint64_t kPage = 4096;

// The file, its offset and the pages left in its piece for page `page` of the region.
struct Place {
  int fd = -1;
  uint64_t offset = 0, pagesLeft = 0;
};

bool Locate(const Mapping& m, uint32_t page, Place* p, SysError& err) {
  uint64_t at = uint64_t{page} * kPage;
  if (m.fd >= 0) {
    if (at >= m.size) return err.set("pread", EINVAL, "page " + std::to_string(page) + " beyond the region"), false;
    *p = {m.fd, at, (m.size - at) / kPage};
    return true;
  }
  for (size_t i = 0; i < m.pieceFds.size(); i++) {
    if (at < m.pieceSizes[i]) {
      *p = {m.pieceFds[i], m.pieceOffsets[i] + at, (m.pieceSizes[i] - at) / kPage};
      return true;
    }
    at -= m.pieceSizes[i];
  }
  return err.set("pread", EBADF, m.released.load() ? "the region was released" : "page " + std::to_string(page) + " beyond the region"), false;
}

// Whole-length pread/pwritev: a short transfer continues, end of file fails.
bool ReadFully(int fd, uint8_t* out, uint64_t bytes, uint64_t offset, SysError& err) {
  while (bytes > 0) {
    ssize_t r = pread(fd, out, bytes, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return err.set("pread", r < 0 ? errno : EIO, r == 0 ? "the region's file ends before its pages" : ""), false;
    out += r, bytes -= static_cast<uint64_t>(r), offset += static_cast<uint64_t>(r);
  }
  return true;
}

bool WriteFully(int fd, iovec* iov, int n, uint64_t offset, SysError& err) {
  while (n > 0) {
    int now = n < IOV_MAX ? n : IOV_MAX;
    ssize_t w = pwritev(fd, iov, now, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return err.set("pwritev", w < 0 ? errno : EIO), false;
    offset += static_cast<uint64_t>(w);
    size_t left = static_cast<size_t>(w);
    while (n > 0 && left >= iov->iov_len) left -= iov->iov_len, iov++, n--;
    if (n > 0) iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + left, iov->iov_len -= left;
  }
  return true;
}

}  // namespace

bool ReadFilesLocked(const Mapping& m, const uint32_t* idx, size_t n, uint8_t* out, SysError& err) {
  for (size_t k = 0; k < n;) {
    Place p;
    if (!Locate(m, idx[k], &p, err)) return false;
    size_t run = 1;
    while (k + run < n && run < p.pagesLeft && idx[k + run] == idx[k] + run) run++;
    if (!ReadFully(p.fd, out + k * kPage, run * kPage, p.offset, err)) return false;
    k += run;
  }
  return true;
}

bool ReadPages(Mapping& m, const uint32_t* idx, size_t n, uint8_t* out, SysError& err, uint8_t* zeroOut) {
  std::shared_lock<std::shared_mutex> lock(m.files);
  if (m.readsInPlace.load(std::memory_order_relaxed)) return ReadInPlaceLocked(m, idx, n, out, zeroOut, err);
  if (zeroOut) std::memset(zeroOut, 0, n);
  return ReadFilesLocked(m, idx, n, out, err);
}

PageWriter::PageWriter(Mapping& m) : m_(m), lock_(m.files), byFile_(WritesByFile(m)) {}

bool PageWriter::Put(uint32_t page, const uint8_t* src, SysError& err) {
  if (!byFile_) {
    std::memcpy(m_.addr + uint64_t{page} * kPage, src, kPage);
    return true;
  }
  if (count_ > 0 && page == first_ + count_ && count_ < runLimit_) {
    iov_.push_back({const_cast<uint8_t*>(src), kPage});
    count_++;
    return true;
  }
  if (!Flush(err)) return false;
  Place p;
  if (!Locate(m_, page, &p, err)) return false;
  first_ = page;
  count_ = 1;
  runLimit_ = p.pagesLeft;
  iov_.push_back({const_cast<uint8_t*>(src), kPage});
  return true;
}

bool PageWriter::Zero(uint32_t page, SysError& err) {
  static const uint8_t kZeroPage[kPage] = {};
  if (!byFile_) return Put(page, kZeroPage, err);
  if (zeroCount_ > 0 && page == zeroFirst_ + zeroCount_ && zeroCount_ < zeroLimit_) {
    zeroCount_++;
    return true;
  }
  Place p;
  if (!Locate(m_, page, &p, err)) return false;
  if (p.fd != punchFd_) {
    struct statfs sf;
    punchFd_ = p.fd;
    punchable_ = fstatfs(p.fd, &sf) == 0 && sf.f_type != TMPFS_MAGIC && sf.f_type != HUGETLBFS_MAGIC;
  }
  if (!punchable_) return Put(page, kZeroPage, err);
  if (!Flush(err)) return false;
  zeroFirst_ = page;
  zeroCount_ = 1;
  zeroLimit_ = p.pagesLeft;
  return true;
}

bool PageWriter::FlushZeros(SysError& err) {
  if (zeroCount_ == 0) return true;
  Place p;
  bool ok = Locate(m_, zeroFirst_, &p, err);
  const off_t len = static_cast<off_t>(uint64_t{zeroCount_} * kPage);
  zeroCount_ = 0;
  if (!ok) return false;
  // a file that punches no hole (EOPNOTSUPP) gets its zeros written
  if (fallocate(p.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(p.offset), len) == 0) return true;
  if (errno != EOPNOTSUPP) return err.set("fallocate(FALLOC_FL_PUNCH_HOLE)", errno), false;
  static const uint8_t kZeroPage[kPage] = {};
  for (off_t at = 0; at < len; at += static_cast<off_t>(kPage)) {
    iovec v{const_cast<uint8_t*>(kZeroPage), kPage};
    if (!WriteFully(p.fd, &v, 1, p.offset + static_cast<uint64_t>(at), err)) return false;
  }
  return true;
}

bool PageWriter::Get(uint32_t page, uint8_t* dst, SysError& err) {
  if (!byFile_) {
    std::memcpy(dst, m_.addr + uint64_t{page} * kPage, kPage);
    return true;
  }
  return Flush(err) && FlushZeros(err) && ReadFilesLocked(m_, &page, 1, dst, err);
}

bool PageWriter::Flush(SysError& err) {
  if (!FlushZeros(err)) return false;
  if (count_ == 0) return true;
  Place p;
  bool ok = Locate(m_, first_, &p, err) && WriteFully(p.fd, iov_.data(), static_cast<int>(iov_.size()), p.offset, err);
  iov_.clear();
  count_ = 0;
  return ok;
}

}  // namespace livemig
