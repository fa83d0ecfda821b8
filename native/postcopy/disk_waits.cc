// Post-copy of disks, destination: see disk_waits.h.
#include "postcopy/disk_waits.h"

#include <sys/fanotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "disk/fanotify.h"
#include "postcopy/postcopy.h"

namespace livemig {
namespace postcopy {

bool DiskWaits::Respond(int fd, bool allow, SysError* err) {
  int e = FanRespond(fan_, fd, allow);
  if (e && err) err->set("write(fanotify response)", e);
  return e == 0;
}

bool DiskWaits::Here(const uint8_t* state, const Pending& p) const {
  for (uint32_t q = p.first; q < p.end; q++)
    if (__atomic_load_n(&state[q], __ATOMIC_RELAXED) < kArrived) return false;
  return true;
}

bool DiskWaits::Read(uint8_t* state, std::vector<uint32_t>& toRequest, SysError& err) {
  alignas(fanotify_event_metadata) uint8_t buf[8192];
  for (;;) {
    ssize_t n = read(fan_, buf, sizeof buf);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return true;  // drained
      return err.set("read(fanotify)", errno), false;
    }
    for (auto* m = reinterpret_cast<fanotify_event_metadata*>(buf); FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
      if (m->vers != FANOTIFY_METADATA_VERSION) return err.set("read(fanotify)", EPROTO, "fanotify metadata version " + std::to_string(m->vers)), false;
      if (m->fd < 0) continue;  // an overflow: nothing waits on it
      accesses_++;
      uint64_t offset = 0, count = UINT64_MAX;  // no range: the whole file
      for (size_t at = m->metadata_len; at + sizeof(fanotify_event_info_header) <= m->event_len;) {
        auto* h = reinterpret_cast<const fanotify_event_info_header*>(reinterpret_cast<uint8_t*>(m) + at);
        if (h->len == 0 || at + h->len > m->event_len) break;
        if (h->info_type == FAN_EVENT_INFO_TYPE_RANGE && h->len >= sizeof(FanRangeInfo)) {
          FanRangeInfo ri;
          std::memcpy(&ri, h, sizeof ri);
          offset = ri.offset, count = ri.count;
        }
        at += h->len;
      }
      struct stat st;
      const DiskRange* disk = nullptr;
      if (fstat(m->fd, &st) == 0) {
        for (const DiskRange& d : disks_)
          if (d.dev == static_cast<uint64_t>(st.st_dev) && d.ino == static_cast<uint64_t>(st.st_ino)) disk = &d;
      }
      if (!disk) {  // not one of ours (the mark is on our images only): let it on
        if (!Respond(m->fd, true, &err)) return false;
        continue;
      }
      const uint64_t bytes = uint64_t{disk->pages} * kPage;
      const uint64_t from = std::min(offset, bytes), to = count > bytes - from ? bytes : from + count;
      Pending p{m->fd, disk->first + static_cast<uint32_t>(from / kPage), disk->first + static_cast<uint32_t>((to + kPage - 1) / kPage), NowNs()};
      for (uint32_t q = p.first; q < p.end; q++) {
        if (state[q] != kMissing) continue;
        state[q] = kRequested;
        toRequest.push_back(q);
      }
      if (Here(state, p)) {
        if (!Respond(p.fd, true, &err)) return false;
      } else {
        waited_++;
        pending_.push_back(p);
      }
    }
  }
}

bool DiskWaits::AnswerReady(const uint8_t* state, SysError& err) {
  for (size_t k = 0; k < pending_.size();) {
    if (!Here(state, pending_[k])) {
      k++;
      continue;
    }
    const Pending p = pending_[k];
    pending_[k] = pending_.back();
    pending_.pop_back();
    {
      std::lock_guard<std::mutex> g(mu_);
      latencies_.push_back(NowNs() - p.since);
    }
    if (!Respond(p.fd, true, &err)) return false;
  }
  return true;
}

void DiskWaits::AnswerRest(const uint8_t* state) {
  for (const Pending& p : pending_) Respond(p.fd, Here(state, p), nullptr);
  pending_.clear();
}

}  // namespace postcopy
}  // namespace livemig
