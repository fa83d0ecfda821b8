// The guest contract, livemig's end: requests to a guest and its replies (docs/GUEST.md). The
// framing is the guest library's own (native/guest/livemig_guest.h), linked in, so that both
// ends read and write one implementation. The guest answers on a thread that does nothing else;
// livemig waits for the answers to the pause's requests on the calling thread, since every hop
// through an event loop inside the pause costs a wake-up.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "common.h"
#include "guest/livemig_guest.h"

namespace livemig {

namespace {

const std::string kLongerThanAllowed = "longer than " + std::to_string(LMG_MAX_BODY >> 20) + " MiB";

// socketPair(seqpacket?: boolean) -> [a, b]: a connected pair (a stream, or with true messages
// that keep their bounds), both close-on-exec.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int sv[2];
  const int type = info.Length() > 0 && info[0].ToBoolean().Value() ? SOCK_SEQPACKET : SOCK_STREAM;
  if (socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) throw MakeSysError(env, "socketpair", errno);
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
  if (len > LMG_MAX_BODY) throw Napi::RangeError::New(env, "message of " + std::to_string(len) + " bytes, " + kLongerThanAllowed);
  if (fds.size() > LMG_MAX_FDS) throw Napi::RangeError::New(env, std::to_string(fds.size()) + " descriptors, more than " + std::to_string(LMG_MAX_FDS));
  if (lmg_message_write(fd, tag, body, len, fds.data(), fds.size()) != 0) throw MakeSysError(env, "sendmsg", errno ? errno : EPIPE, "guest control message");
}

// A message read, owned: its descriptors are closed unless handed on to JavaScript.
struct Reply {
  lmg_message m{};
  Reply() = default;
  Reply(const Reply&) = delete;
  Reply& operator=(const Reply&) = delete;
  ~Reply() { lmg_message_free(&m); }
};

void Receive(int fd, double timeoutMs, Reply& r, SysError& err) {
  int timeout = timeoutMs >= 0x7fffffff ? 0x7fffffff : timeoutMs < 0 ? -1 : static_cast<int>(timeoutMs);
  if (lmg_message_read(fd, &r.m, timeout, -1) == 0) return;
  int e = errno;
  if (e == EPROTO) err.set("recvmsg", e, "guest control message of " + std::to_string(r.m.len) + " bytes, " + kLongerThanAllowed);
  else err.set("recvmsg", e, "guest control reply");
}

// {tag, body, fds} for JavaScript, which owns the descriptors from now on
Napi::Value MessageObject(Napi::Env env, Reply& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("tag", Napi::Number::New(env, r.m.tag));
  o.Set("body", Napi::Buffer<uint8_t>::Copy(env, r.m.body, r.m.len));
  Napi::Array a = Napi::Array::New(env, r.m.nfds);
  for (size_t i = 0; i < r.m.nfds; i++) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, r.m.fds[i]));
  o.Set("fds", a);
  r.m.nfds = 0;
  return o;
}

Napi::Value ReceiveNow(Napi::Env env, int fd, double timeoutMs) {
  Reply r;
  SysError err;
  Receive(fd, timeoutMs, r, err);
  if (err.failed()) throw MakeSysError(env, err);
  return MessageObject(env, r);
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
      [](Napi::Env env, Reply& r) -> Napi::Value { return MessageObject(env, r); });
}

// controlRequest(fd, tag, timeoutMs, body?) -> {tag, body, fds}: a request and its reply.
Napi::Value ControlRequest(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  SendRequest(info.Env(), fd, static_cast<uint8_t>(info[1].As<Napi::Number>().Uint32Value()), info[3], info.Env().Undefined());
  return ReceiveNow(info.Env(), fd, info[2].As<Napi::Number>().DoubleValue());
}

// guestContract() -> the contract's version, limits and tags as livemig_guest.h defines them, for
// the test that holds src/guest/contract.ts equal to them
Napi::Value GuestContract(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("contract", LMG_CONTRACT);
  o.Set("oldestContract", LMG_CONTRACT_OLDEST);
  o.Set("maxRegions", LMG_MAX_REGIONS);
  o.Set("maxDisks", LMG_MAX_DISKS);
  o.Set("disksContract", LMG_CONTRACT_DISKS);
  o.Set("diskBlock", LMG_DISK_BLOCK);
  o.Set("nameMaxLength", LMG_NAME_MAX - 1);
  o.Set("maxBody", static_cast<double>(LMG_MAX_BODY));
  o.Set("maxHello", static_cast<double>(LMG_MAX_HELLO));
  Napi::Object tags = Napi::Object::New(env);
#define LIVEMIG_EXPORT_TAG(name, tag) tags.Set(#name, static_cast<int>(tag));
  LMG_TAGS(LIVEMIG_EXPORT_TAG)
#undef LIVEMIG_EXPORT_TAG
  o.Set("tags", tags);
  return o;
}

}  // namespace

void InitGuestControl(Napi::Env env, Napi::Object exports) {
  exports.Set("socketPair", Napi::Function::New(env, SocketPair));
  exports.Set("controlRequest", Napi::Function::New(env, ControlRequest));
  exports.Set("controlSend", Napi::Function::New(env, ControlSend));
  exports.Set("controlReceive", Napi::Function::New(env, ControlReceive));
  exports.Set("controlReceiveAsync", Napi::Function::New(env, ControlReceiveAsync));
  exports.Set("guestContract", Napi::Function::New(env, GuestContract));
}

}  // namespace livemig
