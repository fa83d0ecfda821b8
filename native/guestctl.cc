// Fast guest control: pause, resume and go as single bytes on a stream socket, answered by a
// thread that does nothing else. A pause answered by the guest's event loop waited behind its
// timers and for a CPU (2-4 ms measured on a 2-CPU host); a blocked read wakes in microseconds.
//
// Wire (one host, one socket pair), the same both ways:
//   tag u8 | length u16 LE | body[length]      (length <= kMaxBody)
// Requests: 'P' pause -> 'p' + run state; 'R' resume -> 'r'; to an incoming guest: 'S' + state
// (load it) -> 's', or 'e' + why; 'U' register for post-copy -> 'u' + u32 uffd + u64 address;
// 'G' go -> 'g'. Anything else -> 'e'.
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <thread>
#include <vector>

#include "common.h"
#include "guestctl.h"

namespace livemig {

GuestGate& TheGuestGate() {
  static GuestGate gate;
  return gate;
}

namespace {

constexpr uint32_t kMaxBody = 4096;

double NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

bool WriteAll(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {  // a non-blocking end: wait until it drains
      pollfd pfd{fd, POLLOUT, 0};
      poll(&pfd, 1, 100);
      continue;
    }
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool Reply(int fd, uint8_t tag, const uint8_t* body, uint16_t len) {
  uint8_t buf[3 + kMaxBody];
  buf[0] = tag;
  buf[1] = static_cast<uint8_t>(len & 0xff);
  buf[2] = static_cast<uint8_t>(len >> 8);
  if (len) std::memcpy(buf + 3, body, len);
  return WriteAll(fd, buf, 3u + len);
}

// Reads exactly n bytes before the deadline (ms on CLOCK_MONOTONIC; < 0: none). Returns 0, or
// an errno: ETIMEDOUT, ECONNRESET for an end of stream, or the read's own.
int ReadExact(int fd, uint8_t* p, size_t n, double deadline) {
  while (n > 0) {
    int wait = -1;
    if (deadline >= 0) {
      double left = deadline - NowMs();
      if (left <= 0) return ETIMEDOUT;
      wait = static_cast<int>(left) + 1;
    }
    pollfd pfd{fd, POLLIN, 0};
    int r = poll(&pfd, 1, wait);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    if (r == 0) continue;  // the deadline check above decides
    ssize_t got = recv(fd, p, n, MSG_DONTWAIT);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got < 0) return errno;
    if (got == 0) return ECONNRESET;
    p += got;
    n -= static_cast<size_t>(got);
  }
  return 0;
}

// socketPair() -> [a, b]: a connected stream pair, both close-on-exec (a child gets its end
// through spawn's stdio, which duplicates it without the flag).
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw MakeSysError(env, "socketpair", errno);
  Napi::Array a = Napi::Array::New(env, 2);
  a.Set(0u, Napi::Number::New(env, sv[0]));
  a.Set(1u, Napi::Number::New(env, sv[1]));
  return a;
}

// Reads one message's header and body; 0 or an errno as ReadExact.
int ReadMessage(int fd, uint8_t* tag, std::vector<uint8_t>* body, double deadline) {
  uint8_t head[3];
  int err = ReadExact(fd, head, 3, deadline);
  if (err) return err;
  uint32_t len = head[1] | (static_cast<uint32_t>(head[2]) << 8);
  if (len > kMaxBody) return EPROTO;
  *tag = head[0];
  body->resize(len);
  return len ? ReadExact(fd, body->data(), len, deadline) : 0;
}

// {tag, body} for JavaScript
Napi::Object MessageObject(Napi::Env env, uint8_t tag, const std::vector<uint8_t>& body) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("tag", Napi::Number::New(env, tag));
  o.Set("body", Napi::Buffer<uint8_t>::Copy(env, body.data(), body.size()));
  return o;
}

void SendRequest(Napi::Env env, int fd, uint8_t tag, Napi::Value bodyValue) {
  const uint8_t* body = nullptr;
  size_t len = 0;
  if (bodyValue.IsBuffer()) {
    body = bodyValue.As<Napi::Buffer<uint8_t>>().Data();
    len = bodyValue.As<Napi::Buffer<uint8_t>>().Length();
  }
  if (len > kMaxBody) throw Napi::RangeError::New(env, "request longer than 4096 bytes");
  if (!Reply(fd, tag, body, static_cast<uint16_t>(len))) throw MakeSysError(env, "send", errno ? errno : EPIPE, "control request");
}

Napi::Value ReceiveReply(Napi::Env env, int fd, double timeoutMs) {
  uint8_t tag;
  std::vector<uint8_t> body;
  int err = ReadMessage(fd, &tag, &body, NowMs() + timeoutMs);
  if (err) throw MakeSysError(env, "recv", err, "control reply");
  return MessageObject(env, tag, body);
}

// controlSend(fd, tag, body?): one request, written at once (the peer reads its socket all the
// time, so a request this small never waits for room).
Napi::Value ControlSend(const Napi::CallbackInfo& info) {
  SendRequest(info.Env(), info[0].As<Napi::Number>().Int32Value(), static_cast<uint8_t>(info[1].As<Napi::Number>().Uint32Value()), info[2]);
  return info.Env().Undefined();
}

// controlReceive(fd, timeoutMs) -> {tag, body}: waits for one reply on the calling thread.
// Blocking on purpose: it runs inside a pause, where every hop through an event loop costs a
// wake-up; the timeout bounds it.
Napi::Value ControlReceive(const Napi::CallbackInfo& info) {
  return ReceiveReply(info.Env(), info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().DoubleValue());
}

// controlRequest(fd, tag, timeoutMs, body?) -> {tag, body}: a request and its reply.
Napi::Value ControlRequest(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  SendRequest(info.Env(), fd, static_cast<uint8_t>(info[1].As<Napi::Number>().Uint32Value()), info[3]);
  return ReceiveReply(info.Env(), fd, info[2].As<Napi::Number>().DoubleValue());
}

// --- guest side ---

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
    for (;;) {
      uint8_t req;
      if (ReadMessage(fd, &req, &body, -1) != 0) break;  // livemig closed its end (or broke the framing)
      bool ok;
      if (req == 'P') {
        uint64_t snap[3];
        {
          std::lock_guard<std::mutex> lock(g.mu);  // a write chunk in progress completes first
          g.paused = true;
          std::memcpy(snap, g.st, sizeof snap);
        }
        ok = Reply(fd, 'p', reinterpret_cast<uint8_t*>(snap), sizeof snap);
        // Paused, the rest of this process (its event loop, the runtime's compiler and garbage
        // collector threads) takes no CPU from the migration: sampled before this, a runtime
        // helper thread here ran 3.5 ms inside the hand-over and held back livemig's thread on
        // its CPU. After the answer, so that the pause is not longer for it.
        if (idleWhenPaused) SetOtherThreadsIdle(true);
      } else if (req == 'R') {
        if (idleWhenPaused) SetOtherThreadsIdle(false);
        g.paused = false;
        ok = Reply(fd, 'r', nullptr, 0);
      } else {
        ok = Reply(fd, 'e', nullptr, 0);
      }
      if (!ok) break;
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
  if (len > kMaxBody) throw Napi::RangeError::New(env, "reply longer than 4096 bytes");
  if (!Reply(fd, tag, body, static_cast<uint16_t>(len))) throw MakeSysError(env, "send", errno ? errno : EPIPE, "control reply");
  return env.Undefined();
}

}  // namespace

void InitGuestControl(Napi::Env env, Napi::Object exports) {
  exports.Set("socketPair", Napi::Function::New(env, SocketPair));
  exports.Set("controlRequest", Napi::Function::New(env, ControlRequest));
  exports.Set("controlSend", Napi::Function::New(env, ControlSend));
  exports.Set("controlReceive", Napi::Function::New(env, ControlReceive));
  exports.Set("gateStart", Napi::Function::New(env, GateStart));
  exports.Set("gatePaused", Napi::Function::New(env, GatePaused));
  exports.Set("gateSetPaused", Napi::Function::New(env, GateSetPaused));
  exports.Set("gateBeat", Napi::Function::New(env, GateBeat));
  exports.Set("waitCommand", Napi::Function::New(env, WaitCommand));
  exports.Set("replyCommand", Napi::Function::New(env, ReplyCommand));
}

}  // namespace livemig
