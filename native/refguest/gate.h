// The reference guest's run gate: its writes and heartbeats pass it, and the guest library's
// thread closes it on a pause request without waiting for the guest's event loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

struct example_disk;

namespace livemig {

struct GuestGate {
  std::mutex mu;  // held while the guest writes a chunk or stamps a beat
  std::atomic<bool> paused{false};
  // a pause waits for `mu`: set first, so that the writer, which takes `mu` again after each
  // chunk, stops instead of winning the lock back (std::mutex is not fair)
  std::atomic<bool> pausing{false};
  uint64_t* st = nullptr;                    // {xorshift state, writes, heartbeat seq}, once the guest serves livemig
  std::atomic<unsigned> throttlePercent{0};  // of the rate withheld, as livemig asked (auto-converge)
};

GuestGate& TheGuestGate();

// native/refguest/disk.cc: the guest's disk, or nullptr when it has none
struct example_disk* TheGuestDisk();

// native/process/sched.cc: a slice of `ns` (0: the default) for the calling thread; false if refused
bool SetThreadSlice(uint64_t ns);
// native/process/sched.cc: every other thread of this process to SCHED_IDLE (true) or back to
// SCHED_OTHER (false); returns how many moved. MayLeaveIdle: whether going back is permitted.
uint32_t SetOtherThreadsIdle(bool idle);
bool MayLeaveIdle();

}  // namespace livemig
