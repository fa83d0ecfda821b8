// Post-copy: what the destination's fault service (postcopy_dest.cc) and the source's page
// server (postcopy_source.cc) share: frame constants and helpers, and the events their threads
// send to JavaScript. The design is described in postcopy.cc.
#pragma once

#include <fcntl.h>
#include <time.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "netio.h"

namespace livemig {
namespace postcopy {

constexpr size_t kPage = 4096;
constexpr size_t kHeader = 12;
constexpr uint16_t kMagic = 0x4D4C;
constexpr uint8_t kPages = 4;
constexpr uint8_t kRequest = 18;   // D->S: u32 count, u32 pages
constexpr uint8_t kComplete = 19;  // D->S: u64 digest of the page hashes, u32 page count
constexpr uint32_t kMaxBatch = 4096;
constexpr size_t kPushChunk = 128 * 1024;  // bytes read from the push stream between fault checks
constexpr size_t kPushChunkWaiting = 16 * 1024;  // ... while a fault waits on a requested page

enum : uint8_t { kMissing = 0, kRequested = 1, kArrived = 2, kMapped = 3 };
enum : uint8_t { kUnsent = 0, kPushing = 1, kPushed = 2, kServed = 3 };

inline uint64_t NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<uint64_t>(t.tv_sec) * 1000000000ULL + static_cast<uint64_t>(t.tv_nsec);
}

inline void PutHeader(uint8_t* h, uint8_t version, uint8_t type, uint32_t length) {
  h[0] = kMagic & 0xff;
  h[1] = kMagic >> 8;
  h[2] = version;
  h[3] = type;
  h[4] = h[5] = h[6] = h[7] = 0;
  Put32(h + 8, length);
}

// A header from the peer: magic, version and reserved bytes checked; type and length returned.
inline bool CheckHeader(const uint8_t* h, uint8_t version, uint8_t* type, uint32_t* length, SysError& err) {
  if (Le16(h) != kMagic) return err.fail("ERR_LIVEMIG_PROTOCOL", "bad frame magic on a post-copy connection"), false;
  if (h[2] != version) return err.fail("ERR_LIVEMIG_VERSION", "post-copy frame of version " + std::to_string(h[2])), false;
  if (h[4] || h[5] || h[6] || h[7]) return err.fail("ERR_LIVEMIG_PROTOCOL", "nonzero flags or reserved bytes in a post-copy frame"), false;
  *type = h[3];
  *length = Le32(h + 8);
  return true;
}

inline int DupBlocking(int fd, bool blocking, SysError& err) {
  int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) return err.set("fcntl(F_DUPFD_CLOEXEC)", errno), -1;
  int fl = fcntl(d, F_GETFL);
  fcntl(d, F_SETFL, blocking ? (fl & ~O_NONBLOCK) : (fl | O_NONBLOCK));
  return d;
}

// Events from a native thread to JavaScript: {type, message?, digest?}.
struct Event {
  std::string type, message, code;
  uint64_t digest = 0;
  uint32_t generation = 0;  // which attachment it is about (source: events of an old connection are stale)
};

inline void CallEvent(Napi::Env env, Napi::Function fn, Event* e) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("type", e->type);
  if (!e->message.empty()) o.Set("message", e->message);
  if (!e->code.empty()) o.Set("code", e->code);
  if (e->type == "complete") o.Set("digest", Napi::BigInt::New(env, e->digest));
  o.Set("generation", e->generation);
  delete e;
  fn.Call({o});
}


Napi::Function DestClass(Napi::Env env);
Napi::Function SourceClass(Napi::Env env);

}  // namespace postcopy
}  // namespace livemig
