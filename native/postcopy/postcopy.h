// Post-copy: what the destination's fault service (dest.cc) and the source's page
// server (source.cc) share: frame constants and helpers, and the events their threads
// send to JavaScript. The design is described in postcopy.cc.
#pragma once

#include <fcntl.h>
#include <time.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "common.h"
#include "io/socket.h"
#include "wire/format.h"

namespace livemig {
namespace postcopy {

// the wire's values (wire/format.h)
constexpr size_t kPage = wire::kPageSize;
constexpr size_t kHeader = wire::kHeaderBytes;
constexpr uint8_t kPages = wire::kPages;
constexpr uint8_t kRequest = wire::kPageRequest;        // D->S: u32 count, u32 pages
constexpr uint8_t kComplete = wire::kPostcopyComplete;  // D->S: u64 digest of the page hashes, u32 page count
constexpr uint32_t kMaxBatch = wire::kMaxBatchPages;
constexpr size_t kPushChunk = 128 * 1024;        // bytes read from the push stream between fault checks
constexpr size_t kPushChunkWaiting = 16 * 1024;  // ... while a fault waits on a requested page

// kClaimed: a disk block the guest's VMM is overwriting whole (lmg_disk_overwrite): here for the
// guest at once, while the source's copy still has to come (to scratch, for its hash)
enum : uint8_t { kMissing = 0, kRequested = 1, kArrived = 2, kMapped = 3, kClaimed = 4 };
inline bool IsHeld(uint8_t s) { return s == kArrived || s == kMapped; }
enum : uint8_t { kUnsent = 0, kPushing = 1, kPushed = 2, kServed = 3 };

inline uint64_t NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<uint64_t>(t.tv_sec) * 1000000000ULL + static_cast<uint64_t>(t.tv_nsec);
}

using wire::PutHeader;

// A header from the peer: the wire's checks, then this session's version and no flags.
inline bool CheckHeader(const uint8_t* h, uint8_t version, uint8_t* type, uint32_t* length, SysError& err) {
  wire::Header hd;
  if (!wire::CheckHeader(h, wire::kMaxPayload, hd, err)) return false;
  if (hd.version != version) return err.fail("ERR_LIVEMIG_VERSION", "post-copy frame of version " + std::to_string(hd.version)), false;
  if (hd.flags != wire::kFlagsNone) return err.fail("ERR_LIVEMIG_PROTOCOL", "nonzero flags in a post-copy frame"), false;
  *type = hd.type;
  *length = hd.length;
  return true;
}

// Events from a native thread to JavaScript: {type, message?, digest?}.
struct Event {
  std::string type, message, code;
  uint64_t digest = 0;
  uint32_t generation = 0;  // which attachment it is about (source: events of an old connection are stale)
};

inline void CallEvent(Napi::Env env, Napi::Function fn, Event* e) {
  std::unique_ptr<Event> owned(e);
  if (env == nullptr || fn.IsEmpty()) return;  // the function is being finalized: nobody listens
  // Raw N-API, no C++ exceptions: a call that throws in here ends the process. A listener's
  // exception stays pending and surfaces as an uncaught one; an environment that can no longer
  // run JavaScript (the process exiting right after a stop) fails the calls: the event is dropped.
  napi_value o, v, result;
  auto set = [&](const char* name, napi_value value) { return napi_set_named_property(env, o, name, value) == napi_ok; };
  auto str = [&](const std::string& s) {
    napi_create_string_utf8(env, s.data(), s.size(), &v);
    return v;
  };
  if (napi_create_object(env, &o) != napi_ok || !set("type", str(e->type))) return;
  if (!e->message.empty() && !set("message", str(e->message))) return;
  if (!e->code.empty() && !set("code", str(e->code))) return;
  if (e->type == "complete" && (napi_create_bigint_uint64(env, e->digest, &v) != napi_ok || !set("digest", v))) return;
  if (napi_create_uint32(env, e->generation, &v) != napi_ok || !set("generation", v)) return;
  napi_call_function(env, env.Undefined(), fn, 1, &o, &result);
}

// Where a service thread's events go: a thread-safe function that may be closed under it. When
// the object is destroyed (a finalizer, or the environment's cleanup at exit, which may be
// tearing the thread-safe function down at that moment) its thread must not call into it:
// Close() waits for a call in progress and drops every later event.
class EventSink {
 public:
  void Init(Napi::Env env, Napi::Function fn, const char* name) {
    tsfn_ = Napi::ThreadSafeFunction::New(env, fn, name, 0, 1);
    tsfn_.Unref(env);  // events matter to whoever awaits them; they must not keep the process alive
  }
  void Emit(Event* e) {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_ || tsfn_.BlockingCall(e, CallEvent) != napi_ok) delete e;  // napi_closing: nobody listens
  }
  void Close() {
    std::lock_guard<std::mutex> g(mu_);
    closed_ = true;
  }
  // Lets the environment finalize the function (not at exit: it may be gone already).
  void Release() {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) return;
    closed_ = true;
    tsfn_.Release();
  }

 private:
  std::mutex mu_;
  bool closed_ = false;
  Napi::ThreadSafeFunction tsfn_;
};

Napi::Function DestClass(Napi::Env env);
Napi::Function SourceClass(Napi::Env env);

}  // namespace postcopy
}  // namespace livemig
