// Fast guest control, livemig's end: requests to a guest and its replies (the guest's end, for
// the reference guest, is refguest/gate.cc). The guest answers on a thread that does nothing else. A pause answered by the guest's event loop waited behind its
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
#include "process/control_msg.h"

namespace livemig {

namespace {

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

void SendRequest(Napi::Env env, int fd, uint8_t tag, Napi::Value bodyValue) {
  const uint8_t* body = nullptr;
  size_t len = 0;
  if (bodyValue.IsBuffer()) {
    body = bodyValue.As<Napi::Buffer<uint8_t>>().Data();
    len = bodyValue.As<Napi::Buffer<uint8_t>>().Length();
  }
  if (len > kMaxControlBody) throw Napi::RangeError::New(env, "request longer than 4096 bytes");
  if (!WriteMessage(fd, tag, body, static_cast<uint16_t>(len))) throw MakeSysError(env, "send", errno ? errno : EPIPE, "control request");
}

Napi::Value ReceiveReply(Napi::Env env, int fd, double timeoutMs) {
  uint8_t tag;
  std::vector<uint8_t> body;
  int err = ReadMessage(fd, &tag, &body, MonotonicMs() + timeoutMs);
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

}  // namespace

void InitGuestControl(Napi::Env env, Napi::Object exports) {
  exports.Set("socketPair", Napi::Function::New(env, SocketPair));
  exports.Set("controlRequest", Napi::Function::New(env, ControlRequest));
  exports.Set("controlSend", Napi::Function::New(env, ControlSend));
  exports.Set("controlReceive", Napi::Function::New(env, ControlReceive));
}

}  // namespace livemig
