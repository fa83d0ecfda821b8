// Blocking socket I/O shared by the migration stream (wire/) and post-copy (postcopy/).
#pragma once

#include <sys/uio.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"
#include "io/bytes.h"

namespace livemig {

constexpr int kMaxIov = 1024;  // IOV_MAX on Linux

// Sends every byte of iov[0..n); advances through partial sends. False with err set.
bool SendAll(int fd, iovec* iov, int n, SysError& err);
// Receives exactly the bytes of iov[0..n); a close at a frame's start and one inside it are
// told apart in the message. False with err set.
bool RecvAll(int fd, iovec* iov, int n, bool atFrameStart, SysError& err);
bool RecvBytes(int fd, void* p, size_t len, bool atFrameStart, SysError& err);
// Appends iovecs covering the given pages of the region, one per run of consecutive pages.
void PageIovecs(uint8_t* base, const uint32_t* idx, size_t count, std::vector<iovec>& out);

}  // namespace livemig
