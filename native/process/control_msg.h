// The guest contract's framing, livemig's end (docs/GUEST.md; the guest's end is
// native/guest/livemig_guest.c):
//   tag u8 | length u32 LE | body[length]      (length <= kMaxControlBody)
// Descriptors (memfds, a userfaultfd) ride on a message's first bytes (SCM_RIGHTS).
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace livemig {

// a device state's largest size (the frame limit on the wire)
constexpr uint32_t kMaxControlBody = 64u * 1024 * 1024;
// descriptors one message may carry: a memfd per region
constexpr size_t kMaxControlFds = 32;

double MonotonicMs();
// One message (and descriptors); false when the connection is gone.
bool WriteMessage(int fd, uint8_t tag, const uint8_t* body, size_t len, const int* fds = nullptr, size_t nfds = 0);
// One message's header and body before the deadline (ms on CLOCK_MONOTONIC; < 0: none), and
// the descriptors that came with it (closed when `fds` is null). 0, or an errno: ETIMEDOUT,
// ECONNRESET for an end of stream, EPROTO for a body longer than allowed, or recvmsg's own.
int ReadMessage(int fd, uint8_t* tag, std::vector<uint8_t>* body, double deadline, std::vector<int>* fds = nullptr);
// {tag, body, fds} for JavaScript
Napi::Object MessageObject(Napi::Env env, uint8_t tag, const std::vector<uint8_t>& body, const std::vector<int>& fds = {});

}  // namespace livemig
