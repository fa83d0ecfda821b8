// Dirty-page tracking mechanisms shared with the data path (see tracking.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace livemig {

// Pages written in [start, end) since they were last protected (uffd async write-protect),
// as page indices relative to `start`; with `rearm`, protects them again in the same walk.
void ScanWritten(int pagemapFd, uint64_t start, uint64_t end, uint64_t pageSize, bool rearm, std::vector<uint32_t>* out, SysError* err);

// A new userfaultfd (non-blocking, close-on-exec, user-mode faults only), or -1 with err set.
int OpenUffd(SysError* err);

}  // namespace livemig
