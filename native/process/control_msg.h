// The guest control socket's framing, both ends (docs/GUEST.md has the contract):
//   tag u8 | length u16 LE | body[length]      (length <= kMaxControlBody)
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace livemig {

constexpr uint32_t kMaxControlBody = 4096;

double MonotonicMs();
bool WriteAll(int fd, const uint8_t* p, size_t n);
// One message; false when the connection is gone.
bool WriteMessage(int fd, uint8_t tag, const uint8_t* body, uint16_t len);
// Reads exactly n bytes before the deadline (ms on CLOCK_MONOTONIC; < 0: none). Returns 0, or
// an errno: ETIMEDOUT, ECONNRESET for an end of stream, or the read's own.
int ReadExact(int fd, uint8_t* p, size_t n, double deadline);
// One message's header and body; 0 or an errno as ReadExact (EPROTO: longer than allowed).
int ReadMessage(int fd, uint8_t* tag, std::vector<uint8_t>* body, double deadline);
// {tag, body} for JavaScript
Napi::Object MessageObject(Napi::Env env, uint8_t tag, const std::vector<uint8_t>& body);

}  // namespace livemig
