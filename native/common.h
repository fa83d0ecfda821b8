// Shared helpers for the livemig addon: errno -> JS error, argument unwrapping.
// The addon is mechanism only; arguments are validated in TypeScript first, so the
// checks here only guard against memory unsafety, not against user mistakes.
#pragma once

#include <napi.h>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>

namespace livemig {

// A failed system call, carried from a worker thread back to JavaScript.
struct SysError {
  std::string syscall;
  int err = 0;
  std::string detail;
  // A livemig error code (ERR_LIVEMIG_*) for failures that are not a system call's, such as
  // a peer breaking the protocol; then `detail` is the whole message.
  std::string code;
  bool failed() const { return !syscall.empty(); }
  void fail(const char* livemigCode, std::string message) {
    syscall = "protocol";
    code = livemigCode;
    detail = std::move(message);
  }
  void set(const char* call, int e, std::string more = "") {
    syscall = call;
    err = e;
    detail = std::move(more);
  }
};

const char* ErrnoName(int err);

// Errors thrown by the addon carry {syscall, errno, errnoName}; src/native.ts turns them
// into LivemigError with a stable ERR_LIVEMIG_* code at the TypeScript call site.
Napi::Error MakeSysError(Napi::Env env, const SysError& e);
Napi::Error MakeSysError(Napi::Env env, const char* syscall, int err, const std::string& detail = "");

inline uint64_t ToU64(const Napi::Value& v) {
  if (v.IsBigInt()) {
    bool lossless = true;
    return v.As<Napi::BigInt>().Uint64Value(&lossless);
  }
  return static_cast<uint64_t>(v.As<Napi::Number>().Int64Value());
}

}  // namespace livemig

#include <functional>
#include <vector>

namespace livemig {

// Runs `work` on the libuv thread pool (no JavaScript inside it) and settles a Promise.
// `keep` holds JS objects (regions, typed arrays) alive until the work is done.
template <typename R>
class Task : public Napi::AsyncWorker {
 public:
  using Work = std::function<void(R&, SysError&)>;
  using Done = std::function<Napi::Value(Napi::Env, R&)>;

  static Napi::Promise Start(Napi::Env env, Work work, Done done, std::vector<Napi::Value> keep = {}) {
    auto* t = new Task(env, std::move(work), std::move(done));
    for (auto& v : keep) {
      if (v.IsObject()) t->keep_.push_back(Napi::Persistent(v.As<Napi::Object>()));
    }
    Napi::Promise p = t->deferred_.Promise();
    t->Queue();
    return p;
  }

  // The same work on the calling thread, settled before this returns: for small work inside a
  // guest's pause, where a pool thread waking up and the loop hearing back cost more than it.
  static Napi::Promise RunNow(Napi::Env env, Work work, Done done) {
    R result{};
    SysError err;
    work(result, err);
    auto d = Napi::Promise::Deferred::New(env);
    if (err.failed()) {
      d.Reject(MakeSysError(env, err).Value());
    } else {
      try {
        d.Resolve(done(env, result));
      } catch (const Napi::Error& e) {
        d.Reject(e.Value());
      }
    }
    return d.Promise();
  }

 protected:
  void Execute() override {
    work_(result_, err_);
    if (err_.failed()) SetError(err_.syscall);
  }
  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    try {
      deferred_.Resolve(done_(env, result_));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }
  void OnError(const Napi::Error&) override {
    Napi::HandleScope scope(Env());
    deferred_.Reject(MakeSysError(Env(), err_).Value());
  }

 private:
  Task(Napi::Env env, Work work, Done done)
      : Napi::AsyncWorker(env, "livemig"), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)), done_(std::move(done)) {}
  Napi::Promise::Deferred deferred_;
  Work work_;
  Done done_;
  R result_{};
  SysError err_;
  std::vector<Napi::ObjectReference> keep_;
};

// Hands a vector of page indices to JavaScript as a Uint32Array without copying it.
Napi::Uint32Array PagesToJs(Napi::Env env, std::vector<uint32_t>&& pages);

}  // namespace livemig
