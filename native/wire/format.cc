// The wire format's checks, shared by the migration stream's reader (wire.cc,
// receive_pages.cc) and the post-copy destination (postcopy/dest.cc).
#include "wire/format.h"

#include <cstdio>

namespace livemig {
namespace wire {

bool CheckHeader(const uint8_t* h, uint32_t maxPayload, Header& out, SysError& err) {
  uint16_t magic = Le16(h);
  out.version = h[2];
  out.type = h[3];
  out.flags = Le16(h + 4);
  uint16_t reserved = Le16(h + 6);
  out.length = Le32(h + 8);
  if (magic != kMagic) {
    char hex[16];
    snprintf(hex, sizeof hex, "%x", magic);
    return err.fail("ERR_LIVEMIG_PROTOCOL", std::string("bad frame magic 0x") + hex + " (expected 0x4d4c): not a livemig stream"), false;
  }
  if (out.type == 0 || out.type > kMaxFrameType) return err.fail("ERR_LIVEMIG_PROTOCOL", "unknown frame type " + std::to_string(out.type)), false;
  if (reserved != 0) return err.fail("ERR_LIVEMIG_PROTOCOL", "reserved header field is " + std::to_string(reserved) + ", not 0"), false;
  // only DEVICE_STATE defines a flag (kFlagProve, version 3: checked against the version by the receiver)
  const uint16_t allowed = out.type == kDeviceState ? kFlagProve : kFlagsNone;
  if (out.flags & ~allowed) {
    char hex[8];
    snprintf(hex, sizeof hex, "%x", out.flags);
    return err.fail("ERR_LIVEMIG_PROTOCOL", "frame of type " + std::to_string(out.type) + " with flags 0x" + hex + ", which the protocol does not define"),
           false;
  }
  if (out.length > maxPayload) {
    return err.fail("ERR_LIVEMIG_FRAME_TOO_LARGE", "frame of type " + std::to_string(out.type) + " announces " + std::to_string(out.length) +
                                                       " payload bytes (max " + std::to_string(maxPayload) + ")"),
           false;
  }
  return true;
}

bool CheckPagesPrefix(const char* what, const uint8_t* prefix, uint32_t maxBatch, uint32_t* round, uint32_t* count, SysError& err) {
  *round = Le32(prefix);
  *count = Le32(prefix + 4);
  if (*count == 0 || *count > maxBatch) {
    return err.fail("ERR_LIVEMIG_PAGE_INDEX", std::string(what) + " count " + std::to_string(*count) + " is outside 1.." + std::to_string(maxBatch)), false;
  }
  return true;
}

bool CheckPlainPagesLength(const char* what, uint32_t length, uint32_t count, SysError& err) {
  uint64_t want = kPagesPrefixBytes + static_cast<uint64_t>(count) * (4 + kPageSize);
  if (length != want) {
    return err.fail("ERR_LIVEMIG_PROTOCOL",
                    std::string(what) + " of " + std::to_string(count) + " pages must be " + std::to_string(want) + " bytes, got " + std::to_string(length)),
           false;
  }
  return true;
}

bool DecodePageIndices(uint32_t* idx, uint32_t count, uint64_t pageCount, SysError& err) {
  for (uint32_t k = 0; k < count; k++) {
    idx[k] = Le32(reinterpret_cast<uint8_t*>(&idx[k]));
    if (idx[k] >= pageCount) {
      return err.fail("ERR_LIVEMIG_PAGE_INDEX", "page index " + std::to_string(idx[k]) + " is outside the region's " + std::to_string(pageCount) + " pages"),
             false;
    }
    // strictly increasing: a page appears once in a frame, and what a frame covers is a set of
    // ascending runs, never one that goes back or overlaps
    if (k > 0 && idx[k] <= idx[k - 1]) {
      return err.fail("ERR_LIVEMIG_PAGE_INDEX",
                      "page index " + std::to_string(idx[k]) + " follows " + std::to_string(idx[k - 1]) + ": a frame's indices must be strictly increasing"),
             false;
    }
  }
  return true;
}

}  // namespace wire
}  // namespace livemig
