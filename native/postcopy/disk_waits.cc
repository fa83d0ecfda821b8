// Post-copy of disks, destination: see disk_waits.h.
#include "postcopy/disk_waits.h"

#include <sys/fanotify.h>
#include <sys/socket.h>
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

bool DiskWaits::Respond(const Pending& p, bool allow, SysError* err) {
  if (p.fd >= 0) return Respond(p.fd, allow, err);
  Answer(p.tag, allow ? 0 : EIO);
  return true;
}

// An answer the VMM cannot take (it went, or stopped reading) is its loss, not the service's:
// the socket is dropped, and the VMM's next ask finds it closed.
void DiskWaits::Answer(uint64_t tag, int error) {
  if (asks_ < 0) return;
  DiskAnswer a{tag, error, 0};
  if (send(asks_, &a, sizeof a, MSG_DONTWAIT | MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof a)) asks_ = -1;
}

bool DiskWaits::Here(const uint8_t* state, const Pending& p) const {
  for (uint32_t q = p.first; q < p.end; q++)
    if (__atomic_load_n(&state[q], __ATOMIC_RELAXED) < kArrived) return false;
  return true;
}

bool DiskWaits::Pages(uint32_t disk, uint64_t offset, uint64_t length, uint32_t* first, uint32_t* end) const {
  if (disk >= disks_.size() || length == 0) return false;
  const DiskRange& d = disks_[disk];
  const uint64_t bytes = uint64_t{d.pages} * kPage;
  if (offset >= bytes || length > bytes - offset) return false;
  *first = d.first + static_cast<uint32_t>(offset / kPage);
  *end = d.first + static_cast<uint32_t>((offset + length + kPage - 1) / kPage);
  return true;
}

// The missing pages of p are requested; p goes on now if every one is here, else it waits.
void DiskWaits::Wait(uint8_t* state, Pending p, std::vector<uint32_t>& toRequest, SysError& err, bool* ok) {
  for (uint32_t q = p.first; q < p.end; q++) {
    if (state[q] != kMissing) continue;
    state[q] = kRequested;
    toRequest.push_back(q);
  }
  if (Here(state, p)) {
    *ok = Respond(p, true, &err);
  } else {
    waited_++;
    pending_.push_back(p);
  }
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
      int disk = -1;
      if (fstat(m->fd, &st) == 0) {
        for (size_t i = 0; i < disks_.size(); i++)
          if (disks_[i].dev == static_cast<uint64_t>(st.st_dev) && disks_[i].ino == static_cast<uint64_t>(st.st_ino)) disk = static_cast<int>(i);
      }
      if (disk < 0) {  // not one of ours (the mark is on our images only): let it on
        if (!Respond(m->fd, true, &err)) return false;
        continue;
      }
      const uint64_t bytes = uint64_t{disks_[disk].pages} * kPage;
      const uint64_t from = std::min(offset, bytes), to = count > bytes - from ? bytes : from + count;
      Pending p{m->fd, 0, 0, 0, NowNs()};
      if (to > from) Pages(static_cast<uint32_t>(disk), from, to - from, &p.first, &p.end);
      bool ok = true;
      Wait(state, p, toRequest, err, &ok);
      if (!ok) return false;
    }
  }
}

bool DiskWaits::ReadAsks(uint8_t* state, std::vector<uint32_t>& toRequest, SysError& err) {
  while (asks_ >= 0) {
    DiskAsk a;
    ssize_t n = recv(asks_, &a, sizeof a, MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) return true;
      asks_ = -1;  // the VMM's socket failed: its asks are its own to fail
      return true;
    }
    if (n == 0) {  // the VMM closed it (the guest went, or has every block)
      asks_ = -1;
      return true;
    }
    // a guest's message is hostile until checked: a short or long one is refused by its tag if
    // it has one, dropped otherwise
    if (n != static_cast<ssize_t>(sizeof a)) {
      if (n >= 8) Answer(a.tag, EPROTO);
      continue;
    }
    Pending p{-1, a.tag, 0, 0, NowNs()};
    if (a.kind != kAskFetch && a.kind != kAskOverwrite) {
      Answer(a.tag, EINVAL);
      continue;
    }
    (a.kind == kAskOverwrite ? overwrites_ : fetches_)++;
    if (!Pages(a.disk, a.offset, a.length, &p.first, &p.end)) {
      Answer(a.tag, ERANGE);
      continue;
    }
    if (a.kind == kAskOverwrite) {
      // whole blocks only: a partial one holds bytes the guest will read back, which must come
      if (a.offset % kPage || a.length % kPage) {
        Answer(a.tag, EINVAL);
        continue;
      }
      for (uint32_t q = p.first; q < p.end; q++) {
        if (state[q] != kMissing && state[q] != kRequested) continue;
        state[q] = kClaimed;
        claimed_++;
      }
      Answer(a.tag, 0);
      continue;
    }
    bool ok = true;
    Wait(state, p, toRequest, err, &ok);
    if (!ok) return false;
  }
  return true;
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
    if (!Respond(p, true, &err)) return false;
  }
  return true;
}

void DiskWaits::AnswerRest(const uint8_t* state) {
  for (const Pending& p : pending_) Respond(p, Here(state, p), nullptr);
  pending_.clear();
}

}  // namespace postcopy
}  // namespace livemig
