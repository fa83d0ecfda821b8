// Reading a guest's pages through the source's own mapping of them, where that is cheaper than
// pread (region/file_io.h): once the mapping is populated (MADV_POPULATE_READ while the
// destination reserves), a page's content is checked where it lies and an all-zero page is
// never copied at all. Which path is cheaper depends on the host (a host that is itself a VM can
// make each first touch through a process's mapping an exit to the hypervisor), so the caller
// times both on the guest's own pages (CompareReadPaths) and chooses.
// Only pages the file holds are read through the mapping (mincore): reading a hole through a
// shared mapping would allocate it. A read that meets the end of a file a hostile guest
// truncated takes SIGBUS; it is caught and the run goes through pread, which fails cleanly.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"
#include "region/region.h"

namespace livemig {

// Pages idx[0..n) copied into out through the mapping where resident; the others, and a run
// whose read faulted, through the files. With zeroOut: a page found all-zero in place is not
// copied and zeroOut[k] is set to 1 (0 for every other page). The caller holds m.files shared.
bool ReadInPlaceLocked(Mapping& m, const uint32_t* idx, size_t n, uint8_t* out, uint8_t* zeroOut, SysError& err);

void InitReadPath(Napi::Env env, Napi::Object exports);

}  // namespace livemig
