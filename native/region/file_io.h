// Pages read and written through the region's files (pread/pwritev) instead of its mapping.
// Where the host is itself a virtual machine, a process's first touch of each 4 KiB page
// through a mapping can cost an exit to the hypervisor: measured on this project's hosts at
// 1.7 us a page to read and 13 us to write a fresh one, while the kernel copies the same pages
// over its own (huge-page) direct map at memory speed (bench/RESULTS.md, "the data path").
// The copy goes into a buffer of a batch's size that stays in cache, and is the only read of
// the guest's memory: what is checked, hashed and sent is that copy, so what the receiver
// holds is exactly what was hashed, even when the guest writes the page meanwhile.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <shared_mutex>
#include <vector>

#include "common.h"
#include "region/region.h"

namespace livemig {

// Copies pages idx[0..n) of the region into out (n pages, in that order), runs of
// consecutive pages in one call. Fails if the region was released. Through the mapping instead
// where the region reads in place (region/read_path.h); then, with zeroOut, a page found all-zero
// there is not copied and zeroOut[k] is 1 (every zeroOut[k] is 0 through the files).
bool ReadPages(Mapping& m, const uint32_t* idx, size_t n, uint8_t* out, SysError& err, uint8_t* zeroOut = nullptr);

// The same through the files only; the caller holds m.files shared.
bool ReadFilesLocked(const Mapping& m, const uint32_t* idx, size_t n, uint8_t* out, SysError& err);

// Writes pages of a region: through its files, consecutive pages in one pwritev, where the
// file takes writes that keep its pages as they are (shmem in 4 KiB pages); through the
// mapping otherwise (hugetlbfs takes no write(2); a write(2) to a THP file would allocate
// 4 KiB pages), or where the receiver populated the mapping to be written (region/read_path.h).
// A page's bytes must stay valid until Flush. Holds the files for its lifetime.
inline bool WritesByFile(const Mapping& m) { return !m.thp && !m.hugetlb && !m.writesInPlace.load(std::memory_order_relaxed); }

class PageWriter {
 public:
  explicit PageWriter(Mapping& m);
  bool Put(uint32_t page, const uint8_t* src, SysError& err);
  // An all-zero page: in a disk image, a hole punched (the block takes no space, as a discarded
  // or zeroed block at the source); in memory, zeros written.
  bool Zero(uint32_t page, SysError& err);
  // Reads a page as written so far (pending writes go first).
  bool Get(uint32_t page, uint8_t* dst, SysError& err);
  bool Flush(SysError& err);
  bool ByFile() const { return byFile_; }

 private:
  Mapping& m_;
  std::shared_lock<std::shared_mutex> lock_;
  bool byFile_;
  uint32_t first_ = 0, count_ = 0;
  uint64_t runLimit_ = 0;  // pages the run may reach (the end of its file's piece)
  std::vector<iovec> iov_;
  // a run of zero pages to punch [zeroFirst_, zeroFirst_ + zeroCount_), within one file
  uint32_t zeroFirst_ = 0, zeroCount_ = 0;
  uint64_t zeroLimit_ = 0;
  int punchFd_ = -1;        // the last file asked about, and whether its holes are punched
  bool punchable_ = false;  // (a disk image: not shmem or hugetlbfs, whose pages are the guest's memory)
  bool FlushZeros(SysError& err);
};

}  // namespace livemig
