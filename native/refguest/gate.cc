// The reference guest's end of the control socket: a thread of its own answers pause and resume
// at once (a pause answered by the guest's event loop waited behind its timers and for a CPU,
// 2-4 ms measured on a 2-CPU host; a blocked read wakes in microseconds), and a gate the
// guest's writes and heartbeats pass, which that thread closes. Built into the reference
// guest's own addon (livemig_guest.node), not the library's.
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <thread>
#include <vector>

#include "common.h"
#include "process/control_msg.h"
#include "refguest/gate.h"

namespace livemig {

GuestGate& TheGuestGate() {
  static GuestGate gate;
  return gate;
}

namespace {

Napi::Reference<Napi::BigUint64Array>& GateState() {
  static Napi::Reference<Napi::BigUint64Array> ref;
  return ref;
}

// gateStart(fd, st: BigUint64Array[3]): a thread answers pause and resume on fd for the life of
// the process; the guest's writes and beats pass the gate (guestWrite, gateBeat).
Napi::Value GateStart(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  Napi::BigUint64Array st = info[1].As<Napi::BigUint64Array>();
  if (st.ElementLength() < 3) throw Napi::RangeError::New(env, "the run state needs 3 words");
  GuestGate& g = TheGuestGate();
  if (g.st) throw Napi::Error::New(env, "the gate already runs");
  GateState() = Napi::Persistent(st);  // the thread reads this memory: keep it alive
  g.st = st.Data();
  std::thread([fd, &g] {
    // this thread only waits for requests, and a pause waits for it: a short slice lets it run
    // as soon as one comes instead of behind a busy thread's slice (EEVDF, Linux >= 6.12; a
    // kernel without custom slices keeps the default)
    SetThreadSlice(100000);
    // only where the threads can be given their place back on resume
    const bool idleWhenPaused = MayLeaveIdle();
    std::vector<uint8_t> body;
    // A pause may come with a lease (u32 LE ms, the body of 'P'): while paused and not told
    // that livemig commits ('C'), hearing nothing for that long, or livemig's end closing,
    // means livemig stalled or died before its point of commitment; the destination cannot
    // activate without the COMMIT that follows 'c', so the guest resumes itself here. After
    // 'C' it never does: the guest may already run at the destination.
    double leaseMs = 0;
    bool committed = false;
    bool selfResumed = false;  // 'C' after that is refused: livemig must not commit
    auto resumeSelf = [&] {
      if (idleWhenPaused) SetOtherThreadsIdle(false);
      std::lock_guard<std::mutex> lock(g.mu);
      g.paused = false;
      selfResumed = true;
    };
    for (;;) {
      uint8_t req;
      const bool leased = g.paused.load() && !committed && leaseMs > 0;
      int err = ReadMessage(fd, &req, &body, leased ? MonotonicMs() + leaseMs : -1);
      if (err == ETIMEDOUT && leased) {
        resumeSelf();
        continue;
      }
      if (err != 0) {
        // livemig closed its end (or broke the framing)
        if (g.paused.load() && !committed) resumeSelf();
        break;
      }
      bool ok;
      if (req == 'P') {
        uint64_t snap[3];
        {
          std::lock_guard<std::mutex> lock(g.mu);  // a write chunk in progress completes first
          g.paused = true;
          std::memcpy(snap, g.st, sizeof snap);
        }
        leaseMs = 0;
        if (body.size() == 4) leaseMs = body[0] | (body[1] << 8) | (body[2] << 16) | (static_cast<uint32_t>(body[3]) << 24);
        committed = false;
        selfResumed = false;
        ok = WriteMessage(fd, 'p', reinterpret_cast<uint8_t*>(snap), sizeof snap);
        // Paused, the rest of this process (its event loop, the runtime's compiler and garbage
        // collector threads) takes no CPU from the migration: sampled before this, a runtime
        // helper thread here ran 3.5 ms inside the hand-over and held back livemig's thread on
        // its CPU. After the answer, so that the pause is not longer for it.
        if (idleWhenPaused) SetOtherThreadsIdle(true);
      } else if (req == 'C') {
        if (selfResumed || !g.paused.load()) {
          static const char why[] = "not paused: the guest resumed itself when its lease ran out";
          ok = WriteMessage(fd, 'e', reinterpret_cast<const uint8_t*>(why), sizeof why - 1);
        } else {
          committed = true;
          ok = WriteMessage(fd, 'c', nullptr, 0);
        }
      } else if (req == 'R') {
        if (idleWhenPaused && g.paused.load()) SetOtherThreadsIdle(false);
        g.paused = false;
        committed = false;
        ok = WriteMessage(fd, 'r', nullptr, 0);
      } else {
        ok = WriteMessage(fd, 'e', nullptr, 0);
      }
      if (!ok) {
        if (g.paused.load() && !committed) resumeSelf();
        break;
      }
    }
    close(fd);
  }).detach();
  return env.Undefined();
}

Napi::Value GatePaused(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), TheGuestGate().paused.load());
}

Napi::Value GateSetPaused(const Napi::CallbackInfo& info) {
  GuestGate& g = TheGuestGate();
  std::lock_guard<std::mutex> lock(g.mu);
  g.paused = info[0].ToBoolean().Value();
  return info.Env().Undefined();
}

// gateBeat(st) -> the heartbeat's sequence number, or -1 when paused: a paused guest must not
// beat, or an observer would see it alive after its state was taken.
Napi::Value GateBeat(const Napi::CallbackInfo& info) {
  GuestGate& g = TheGuestGate();
  uint64_t* st = info[0].As<Napi::BigUint64Array>().Data();
  std::lock_guard<std::mutex> lock(g.mu);
  if (g.paused) return Napi::Number::New(info.Env(), -1);
  return Napi::Number::New(info.Env(), static_cast<double>(st[2]++));
}

// waitCommand(fd) -> {tag, body}, or null at end of stream. Blocks the calling thread: an
// incoming guest has nothing to run until it is told to go.
Napi::Value WaitCommand(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint8_t req;
  std::vector<uint8_t> body;
  int err = ReadMessage(fd, &req, &body, -1);
  if (err == ECONNRESET) return env.Null();
  if (err) throw MakeSysError(env, "recv", err, "waiting for a command");
  return MessageObject(env, req, body);
}

// replyCommand(fd, tag, body?)
Napi::Value ReplyCommand(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint8_t tag = static_cast<uint8_t>(info[1].As<Napi::Number>().Uint32Value());
  const uint8_t* body = nullptr;
  size_t len = 0;
  if (info.Length() > 2 && info[2].IsBuffer()) {
    body = info[2].As<Napi::Buffer<uint8_t>>().Data();
    len = info[2].As<Napi::Buffer<uint8_t>>().Length();
  }
  if (len > kMaxControlBody) throw Napi::RangeError::New(env, "reply longer than 4096 bytes");
  if (!WriteMessage(fd, tag, body, static_cast<uint16_t>(len))) throw MakeSysError(env, "send", errno ? errno : EPIPE, "control reply");
  return env.Undefined();
}

}  // namespace

void InitGate(Napi::Env env, Napi::Object exports) {
  exports.Set("gateStart", Napi::Function::New(env, GateStart));
  exports.Set("gatePaused", Napi::Function::New(env, GatePaused));
  exports.Set("gateSetPaused", Napi::Function::New(env, GateSetPaused));
  exports.Set("gateBeat", Napi::Function::New(env, GateBeat));
  exports.Set("waitCommand", Napi::Function::New(env, WaitCommand));
  exports.Set("replyCommand", Napi::Function::New(env, ReplyCommand));
}

}  // namespace livemig
