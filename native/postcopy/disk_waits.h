// Post-copy of disks, destination: the guest's reads and writes of its disk images wait on
// fanotify pre-content events (Linux >= 6.14) while the blocks they touch are fetched. The fault
// service's thread (dest.cc) polls the fanotify descriptor beside the guest's userfaultfd; the
// blocks are pages of the same page space, so they come as any page does, and an access goes
// on once every block it touches has arrived.
//
// A VMM that links the guest library may also ask directly (lmg_disk_fetch, lmg_disk_overwrite)
// on a socket of its own: a fetch waits like an access, an overwrite of whole blocks needs no
// fetch (the source's copy, still to come, lands in scratch for its hash, and the guest's write
// stays). Messages on that socket (SOCK_SEQPACKET, one host, native byte order): DiskAsk in,
// DiskAnswer out.
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

// what the library sends (livemig_guest.c writes the same layout)
struct DiskAsk {
  uint64_t tag;  // the caller's, echoed in the answer
  uint32_t disk;
  uint32_t kind;  // kAskFetch or kAskOverwrite
  uint64_t offset, length;
};
struct DiskAnswer {
  uint64_t tag;
  int32_t error;  // 0, or an errno: EIO (the service ended first), EINVAL, ERANGE (a bad ask)
  uint32_t reserved;
};
constexpr uint32_t kAskFetch = 1, kAskOverwrite = 2;

class DiskWaits {
 public:
  // the images marked on `fan`, each where it lies in the page space (before the thread starts)
  void Init(int fan, std::vector<DiskRange> disks) {
    fan_ = fan;
    disks_ = std::move(disks);
  }

  // the service's end of the socket the guest's VMM asks on (-1: none)
  void InitAsks(int fd) { asks_ = fd; }

  int fd() const { return fan_; }
  int asksFd() const { return asks_; }
  bool active() const { return fan_ >= 0 || asks_ >= 0; }
  bool waiting() const { return !pending_.empty(); }
  // the first page past the guest's memory (the disks follow it), or the page count without disks
  uint32_t firstDiskPage(uint32_t pages) const { return disks_.empty() ? pages : disks_.front().first; }

  // Reads every access waiting: one whose blocks are all here goes on now; the missing pages of
  // the others are marked requested and appended to toRequest. False with err set.
  bool Read(uint8_t* state, std::vector<uint32_t>& toRequest, SysError& err);
  // Reads the VMM's asks: a fetch waits like an access; an overwrite claims its whole blocks and
  // is answered at once. A closed socket (the guest went) is polled no more.
  bool ReadAsks(uint8_t* state, std::vector<uint32_t>& toRequest, SysError& err);
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
  uint64_t fetches() const { return fetches_; }
  uint64_t overwrites() const { return overwrites_; }
  uint64_t pagesClaimed() const { return claimed_; }

 private:
  struct Pending {
    int fd;               // the access's event descriptor, or -1: the VMM asked (tag)
    uint64_t tag;         // the ask's
    uint32_t first, end;  // pages
    uint64_t since;
  };
  bool Respond(const Pending& p, bool allow, SysError* err);
  bool Respond(int fd, bool allow, SysError* err);
  void Answer(uint64_t tag, int error);
  // pages [first, end) of the disk the range lies in, or false when it lies outside every disk
  bool Pages(uint32_t disk, uint64_t offset, uint64_t length, uint32_t* first, uint32_t* end) const;
  void Wait(uint8_t* state, Pending p, std::vector<uint32_t>& toRequest, SysError& err, bool* ok);
  bool Here(const uint8_t* state, const Pending& p) const;

  int fan_ = -1;
  int asks_ = -1;
  std::vector<DiskRange> disks_;
  std::vector<Pending> pending_;
  mutable std::mutex mu_;
  std::vector<uint64_t> latencies_;  // under mu_
  uint64_t accesses_ = 0, waited_ = 0, fetches_ = 0, overwrites_ = 0, claimed_ = 0;
};

}  // namespace postcopy
}  // namespace livemig
