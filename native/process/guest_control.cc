// The guest contract, livemig's end: requests to a guest and its replies (docs/GUEST.md; the
// guest's end is native/guest/livemig_guest.c). The guest answers on a thread that does
// nothing else; livemig waits for the answers to the pause's requests on the calling thread,
// since every hop through an event loop inside the pause costs a wake-up.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <vector>

#include "common.h"
#include "process/control_msg.h"

namespace livemig {

namespace {

// socketPair() -> [a, b]: a connected stream pair, both close-on-exec.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) throw MakeSysError(env, "socketpair", errno);
  Napi::Array a = Napi::Array::New(env, 2);
  a.Set(0u, Napi::Number::New(env, sv[0]));
  a.Set(1u, Napi::Number::New(env, sv[1]));
  return a;
}

void SendRequest(Napi::Env env, int fd, uint8_t tag, Napi::Value bodyValue, Napi::Value fdsValue) {
  const uint8_t* body = nullptr;
  size_t len = 0;
  if (bodyValue.IsBuffer()) {
    body = bodyValue.As<Napi::Buffer<uint8_t>>().Data();
    len = bodyValue.As<Napi::Buffer<uint8_t>>().Length();
  }
  std::vector<int> fds;
  if (fdsValue.IsArray()) {
    Napi::Array a = fdsValue.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) fds.push_back(a.Get(i).As<Napi::Number>().Int32Value());
  }
  if (len > kMaxControlBody) throw Napi::RangeError::New(env, "message longer than 64 MiB");
  if (fds.size() > kMaxControlFds) throw Napi::RangeError::New(env, "more than 32 descriptors");
  if (!WriteMessage(fd, tag, body, len, fds.data(), fds.size())) throw MakeSysError(env, "sendmsg", errno ? errno : EPIPE, "guest control message");
}

struct Reply {
  uint8_t tag = 0;
  std::vector<uint8_t> body;
  std::vector<int> fds;
};

void Receive(int fd, double timeoutMs, Reply& r, SysError& err) {
  int e = ReadMessage(fd, &r.tag, &r.body, MonotonicMs() + timeoutMs, &r.fds);
  if (e) {
    for (int f : r.fds) close(f);
    r.fds.clear();
    err.set("recvmsg", e, e == EPROTO ? "guest control message longer than 64 MiB" : "guest control reply");
  }
}

Napi::Value ReceiveNow(Napi::Env env, int fd, double timeoutMs) {
  Reply r;
  SysError err;
  Receive(fd, timeoutMs, r, err);
  if (err.failed()) throw MakeSysError(env, err);
  return MessageObject(env, r.tag, r.body, r.fds);
}

// controlSend(fd, tag, body?, fds?): one message, written at once (the guest reads its socket
// all the time, so a request never waits long for room).
Napi::Value ControlSend(const Napi::CallbackInfo& info) {
  SendRequest(info.Env(), info[0].As<Napi::Number>().Int32Value(), static_cast<uint8_t>(info[1].As<Napi::Number>().Uint32Value()), info[2], info[3]);
  return info.Env().Undefined();
}

// controlReceive(fd, timeoutMs) -> {tag, body, fds}: waits for one message on the calling
// thread (inside a pause); the timeout bounds it.
Napi::Value ControlReceive(const Napi::CallbackInfo& info) {
  return ReceiveNow(info.Env(), info[0].As<Napi::Number>().Int32Value(), info[1].As<Napi::Number>().DoubleValue());
}

// controlReceiveAsync(fd, timeoutMs) -> Promise<{tag, body, fds}>: the same on a pool thread,
// for answers that take a while (a guest mapping its memory) outside a pause.
Napi::Value ControlReceiveAsync(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  double timeoutMs = info[1].As<Napi::Number>().DoubleValue();
  return Task<Reply>::Start(
      info.Env(), [fd, timeoutMs](Reply& r, SysError& err) { Receive(fd, timeoutMs, r, err); },
      [](Napi::Env env, Reply& r) -> Napi::Value { return MessageObject(env, r.tag, r.body, r.fds); });
}

// controlRequest(fd, tag, timeoutMs, body?) -> {tag, body, fds}: a request and its reply.
Napi::Value ControlRequest(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  SendRequest(info.Env(), fd, static_cast<uint8_t>(info[1].As<Napi::Number>().Uint32Value()), info[3], info.Env().Undefined());
  return ReceiveNow(info.Env(), fd, info[2].As<Napi::Number>().DoubleValue());
}

}  // namespace

void InitGuestControl(Napi::Env env, Napi::Object exports) {
  exports.Set("socketPair", Napi::Function::New(env, SocketPair));
  exports.Set("controlRequest", Napi::Function::New(env, ControlRequest));
  exports.Set("controlSend", Napi::Function::New(env, ControlSend));
  exports.Set("controlReceive", Napi::Function::New(env, ControlReceive));
  exports.Set("controlReceiveAsync", Napi::Function::New(env, ControlReceiveAsync));
}

}  // namespace livemig
