// Post-copy of disks, destination: the guest's reads and writes of its disk images wait on
// fanotify pre-content events (Linux >= 6.14) while the blocks they touch are fetched. The fault
// service's thread (dest.cc) polls the fanotify descriptor beside the guest's userfaultfd; the
// blocks are pages of the same page space, so they come as any page does, and an access goes
// on once every block it touches has arrived.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "common.h"

namespace livemig {
namespace postcopy {

// A disk in the page space: its pages, and which file it is (an event names its file by a descriptor)
struct DiskRange {
  uint32_t first, pages;
  uint64_t dev, ino;
};

class DiskWaits {
 public:
  // the images marked on `fan`, each where it lies in the page space (before the thread starts)
  void Init(int fan, std::vector<DiskRange> disks) {
    fan_ = fan;
    disks_ = std::move(disks);
  }

  int fd() const { return fan_; }
  bool active() const { return fan_ >= 0; }
  bool waiting() const { return !pending_.empty(); }
  // the first page past the guest's memory (the disks follow it), or the page count without disks
  uint32_t firstDiskPage(uint32_t pages) const { return disks_.empty() ? pages : disks_.front().first; }

  // Reads every access waiting: one whose blocks are all here goes on now; the missing pages of
  // the others are marked requested and appended to toRequest. False with err set.
  bool Read(uint8_t* state, std::vector<uint32_t>& toRequest, SysError& err);
  // Lets every access whose blocks have all arrived go on.
  bool AnswerReady(const uint8_t* state, SysError& err);
  // The service ends: an access whose blocks are all here goes on, any other fails with EIO.
  void AnswerRest(const uint8_t* state);

  // ns each access waited for blocks that had to come (in the order answered)
  std::vector<uint64_t> Latencies() const {
    std::lock_guard<std::mutex> g(mu_);
    return latencies_;
  }
  uint64_t accesses() const { return accesses_; }
  uint64_t accessesWaited() const { return waited_; }

 private:
  struct Pending {
    int fd;
    uint32_t first, end;  // pages
    uint64_t since;
  };
  bool Respond(int fd, bool allow, SysError* err);
  bool Here(const uint8_t* state, const Pending& p) const;

  int fan_ = -1;
  std::vector<DiskRange> disks_;
  std::vector<Pending> pending_;
  mutable std::mutex mu_;
  std::vector<uint64_t> latencies_;  // under mu_
  uint64_t accesses_ = 0, waited_ = 0;
};

}  // namespace postcopy
}  // namespace livemig
