// Blocking socket I/O shared by the migration stream (wire.cc) and post-copy (postcopy.cc).
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"

namespace livemig {

constexpr int kMaxIov = 1024;  // IOV_MAX on Linux

inline uint32_t Le32(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24); }
inline uint16_t Le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline void Put32(uint8_t* p, uint32_t v) {
  p[0] = v & 0xff;
  p[1] = (v >> 8) & 0xff;
  p[2] = (v >> 16) & 0xff;
  p[3] = v >> 24;
}

// Sends every byte of iov[0..n); advances through partial sends. False with err set.
bool SendAll(int fd, iovec* iov, int n, SysError& err);
// Receives exactly the bytes of iov[0..n); a close at a frame's start and one inside it are
// told apart in the message. False with err set.
bool RecvAll(int fd, iovec* iov, int n, bool atFrameStart, SysError& err);
bool RecvBytes(int fd, void* p, size_t len, bool atFrameStart, SysError& err);
// Appends iovecs covering the given pages of the region, one per run of consecutive pages.
void PageIovecs(uint8_t* base, const uint32_t* idx, size_t count, std::vector<iovec>& out);

}  // namespace livemig
