// fanotify pre-content events (Linux >= 6.14), as both their listeners use them: the disk fill
// (native/disk/precontent.cc) and post-copy's fault service (native/postcopy/disk_waits.cc).
#pragma once

#include <errno.h>
#include <sys/fanotify.h>
#include <unistd.h>

#include <cstdint>

// not in every libc's headers yet (include/uapi/linux/fanotify.h, 6.14)
#ifndef FAN_PRE_ACCESS
#define FAN_PRE_ACCESS 0x00100000
#endif
#ifndef FAN_EVENT_INFO_TYPE_RANGE
#define FAN_EVENT_INFO_TYPE_RANGE 6
#endif

namespace livemig {

// the range an access event covers (FAN_EVENT_INFO_TYPE_RANGE)
struct FanRangeInfo {
  uint8_t infoType;
  uint8_t pad;
  uint16_t len;
  uint32_t pad2;
  uint64_t offset;
  uint64_t count;
};

// Answers the access waiting on event descriptor `fd` (which is closed): it goes on (allow), or
// fails with EIO, as a disk error would (FAN_DENY_ERRNO, 6.14; a kernel that takes no errno there
// makes it EPERM). Returns 0, or the errno of the failed answer.
inline int FanRespond(int fan, int fd, bool allow) {
  constexpr uint32_t kDenyEio = FAN_DENY | (static_cast<uint32_t>(EIO) << 24);
  fanotify_response r{fd, allow ? static_cast<uint32_t>(FAN_ALLOW) : kDenyEio};
  ssize_t w = write(fan, &r, sizeof r);
  if (w < 0 && errno == EINVAL && !allow) {
    r.response = FAN_DENY;
    w = write(fan, &r, sizeof r);
  }
  int e = w == static_cast<ssize_t>(sizeof r) ? 0 : w < 0 ? errno : EIO;
  if (fd >= 0) close(fd);
  return e;
}

}  // namespace livemig
