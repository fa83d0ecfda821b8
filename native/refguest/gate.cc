// The reference guest's end of the guest contract, on top of the C library every guest may use
// (native/guest/livemig_guest.h): the library's thread answers livemig at once (a pause answered
// by the guest's event loop waited behind its timers and for a CPU, 2-4 ms measured on a 2-CPU
// host), and the guest's writes and heartbeats pass a gate that the pause closes. Built into
// the reference guest's own addon (livemig_guest.node), not the library's.
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "guest/example/example_disk.h"
#include "guest/livemig_guest.h"
#include "refguest/gate.h"

namespace livemig {

GuestGate& TheGuestGate() {
  static GuestGate gate;
  return gate;
}

namespace {

// The state's fields a pause does not change, as JSON without its closing brace; the pause
// appends the run state (xorshift, writes, heartbeat sequence) and closes it.
std::string g_statePrefix;
// only where the threads can be given their place back on resume
bool g_idleWhenPaused = false;
Napi::Reference<Napi::BigUint64Array> g_stRef;

int OnPause(void*, uint8_t** state, size_t* len, char*, size_t) {
  GuestGate& g = TheGuestGate();
  example_disk* disk = TheGuestDisk();
  uint64_t snap[3], diskSnap[2] = {0, 0};
  g.pausing = true;
  {
    std::lock_guard<std::mutex> lock(g.mu);  // a write chunk (or a disk write) in progress completes first
    g.paused = true;
    std::memcpy(snap, g.st, sizeof snap);
    if (disk) diskSnap[0] = disk->xs, diskSnap[1] = disk->writes;
  }
  g.pausing = false;
  char diskRun[96] = "";
  if (disk)
    snprintf(diskRun, sizeof diskRun, ",\"diskXs\":\"%llu\",\"diskWrites\":\"%llu\"", static_cast<unsigned long long>(diskSnap[0]),
             static_cast<unsigned long long>(diskSnap[1]));
  char run[192];
  int n = snprintf(run, sizeof run, ",\"xs\":\"%llu\",\"writes\":\"%llu\",\"heartbeatSeq\":%llu,\"throttle\":0%s}", static_cast<unsigned long long>(snap[0]),
                   static_cast<unsigned long long>(snap[1]), static_cast<unsigned long long>(snap[2]), diskRun);
  *len = g_statePrefix.size() + static_cast<size_t>(n);
  *state = static_cast<uint8_t*>(malloc(*len));
  std::memcpy(*state, g_statePrefix.data(), g_statePrefix.size());
  std::memcpy(*state + g_statePrefix.size(), run, static_cast<size_t>(n));
  return 0;
}

// Paused, the rest of this process (its event loop, the runtime's compiler and garbage
// collector threads) takes no CPU from the migration: sampled before this, a runtime helper
// thread here ran 3.5 ms inside the hand-over and held back livemig's thread on its CPU.
// After the answer, so that the pause is not longer for it.
void OnPaused(void*) {
  if (g_idleWhenPaused) SetOtherThreadsIdle(true);
}

void OnResume(void*) {
  GuestGate& g = TheGuestGate();
  if (g_idleWhenPaused) SetOtherThreadsIdle(false);
  std::lock_guard<std::mutex> lock(g.mu);
  g.paused = false;
  g.throttlePercent = 0;
}

int OnThrottle(void*, unsigned percent) {
  TheGuestGate().throttlePercent = percent;
  return 0;
}

void OnReleased(void*) {
  // it runs at the destination now; freeing a large region is kernel work charged to this
  // process: keep it out of the way of whatever runs next
  setpriority(PRIO_PROCESS, 0, 19);
  _exit(0);
}

// This thread only waits for requests, and a pause waits for it: a short slice lets it run as
// soon as one comes instead of behind a busy thread's slice (EEVDF, Linux >= 6.12).
void OnThreadStart(void*) { SetThreadSlice(100000); }

std::string Message(const char* what, const char* err) { return std::string(what) + ": " + err; }

// serve(path, regions: [{address, size, fd, offset?, tracked}], st: BigUint64Array[3], statePrefix,
// [{name, register}]): the library's thread serves livemig at path for the life of the process
// (with register: dials the daemon at path, and is listed there by name).
Napi::Value Serve(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  Napi::Array list = info[1].As<Napi::Array>();
  Napi::BigUint64Array st = info[2].As<Napi::BigUint64Array>();
  if (st.ElementLength() < 3) throw Napi::RangeError::New(env, "the run state needs 3 words");
  GuestGate& g = TheGuestGate();
  if (g.st) throw Napi::Error::New(env, "the guest already serves");
  g_statePrefix = info[3].As<Napi::String>().Utf8Value();
  g_stRef = Napi::Persistent(st);  // the library's thread reads this memory: keep it alive
  g.st = st.Data();
  g_idleWhenPaused = MayLeaveIdle();
  std::vector<lmg_region> regions(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Object r = list.Get(i).As<Napi::Object>();
    lmg_region& region = regions[i];
    region.id = i;
    std::snprintf(region.name, sizeof region.name, list.Length() == 1 ? "ram" : "ram-%u", i);
    region.addr = reinterpret_cast<void*>(ToU64(r.Get("address")));
    region.size = ToU64(r.Get("size"));
    region.fd = r.Get("fd").As<Napi::Number>().Int32Value();
    region.offset = r.Has("offset") ? ToU64(r.Get("offset")) : 0;
    region.tracked = r.Get("tracked").ToBoolean().Value() ? 1 : 0;
  }
  std::string name = "reference-guest";
  bool dial = false;
  if (info.Length() > 4 && info[4].IsObject()) {
    Napi::Object o = info[4].As<Napi::Object>();
    if (o.Get("name").IsString()) name = o.Get("name").As<Napi::String>().Utf8Value();
    dial = o.Get("register").ToBoolean().Value();
  }
  static const lmg_source_ops ops = {sizeof(lmg_source_ops), nullptr, OnPause, OnPaused, OnResume, OnThrottle, OnReleased, OnThreadStart};
  char err[512];
  example_disk* disk = TheGuestDisk();
  const lmg_disk* disks = disk ? &disk->d : nullptr;
  const size_t nd = disk ? 1 : 0;
  lmg_source* s = dial ? lmg_source_register_disks(path.c_str(), name.c_str(), regions.data(), regions.size(), disks, nd, &ops, err, sizeof err)
                       : lmg_source_start_disks(path.c_str(), name.c_str(), regions.data(), regions.size(), disks, nd, &ops, err, sizeof err);
  if (!s) throw Napi::Error::New(env, Message(dial ? "registering with the daemon" : "serving livemig", err));
  return env.Undefined();
}

Napi::Value GatePaused(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), TheGuestGate().paused.load()); }

// the throttle livemig asked for (percent of the rate withheld)
Napi::Value GateThrottle(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), TheGuestGate().throttlePercent.load()); }

// gateBeat(st) -> the heartbeat's sequence number, or -1 when paused: a paused guest must not
// beat, or an observer would see it alive after its state was taken.
Napi::Value GateBeat(const Napi::CallbackInfo& info) {
  GuestGate& g = TheGuestGate();
  uint64_t* st = info[0].As<Napi::BigUint64Array>().Data();
  std::lock_guard<std::mutex> lock(g.mu);
  if (g.paused) return Napi::Number::New(info.Env(), -1);
  return Napi::Number::New(info.Env(), static_cast<double>(st[2]++));
}

// ---- incoming ----

struct Incoming {
  lmg_incoming* h = nullptr;
  std::atomic<bool> allPresent{false};
  Napi::Env env = nullptr;
  Napi::Function loadState;
};

void OnAllPresent(void* ctx) { static_cast<Incoming*>(ctx)->allPresent = true; }

// The state check is the guest's own JavaScript: called synchronously, on the thread that
// called incomingWait (this one), which is blocked in it.
int OnLoadState(void* ctx, const uint8_t* state, size_t len, char* why, size_t whylen) {
  Incoming* in = static_cast<Incoming*>(ctx);
  Napi::Value r = in->loadState.Call({Napi::Buffer<uint8_t>::Copy(in->env, state, len)});
  if (in->env.IsExceptionPending()) {
    Napi::Error e = in->env.GetAndClearPendingException();
    std::snprintf(why, whylen, "%s", e.Message().c_str());
    return -1;
  }
  if (r.IsString()) {
    std::snprintf(why, whylen, "%s", r.As<Napi::String>().Utf8Value().c_str());
    return -1;
  }
  return 0;
}

// incomingOpen(path, timeoutMs) -> {handle, regions: [{address, size, name, fd, offset}]}: waits for
// livemig, receives the regions and maps them (blocking: there is nothing else to run yet).
Napi::Value IncomingOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  char err[512];
  auto* in = new Incoming();
  in->h = lmg_incoming_open(path.c_str(), "reference-guest", info[1].As<Napi::Number>().Int32Value(), err, sizeof err);
  if (!in->h) {
    delete in;
    throw Napi::Error::New(env, Message("receiving the regions", err));
  }
  const lmg_region* regions;
  size_t n = lmg_incoming_regions(in->h, &regions);
  Napi::Array list = Napi::Array::New(env, n);
  for (size_t i = 0; i < n; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("address", Napi::BigInt::New(env, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(regions[i].addr))));
    o.Set("size", static_cast<double>(regions[i].size));
    o.Set("name", regions[i].name);
    // the memfd the library keeps open, and where the region starts in it: to serve livemig again later
    o.Set("fd", regions[i].fd);
    o.Set("offset", static_cast<double>(regions[i].offset));
    list.Set(static_cast<uint32_t>(i), o);
  }
  const lmg_disk* disks;
  size_t nd = lmg_incoming_disks(in->h, &disks);
  Napi::Array diskList = Napi::Array::New(env, nd);
  for (size_t i = 0; i < nd; i++) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", disks[i].name);
    o.Set("size", static_cast<double>(disks[i].size));
    o.Set("fd", disks[i].fd);  // the library's, open until the handle closes (never: it lives as long as the process)
    diskList.Set(static_cast<uint32_t>(i), o);
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("handle", Napi::External<Incoming>::New(env, in));  // lives as long as the process
  out.Set("regions", list);
  out.Set("disks", diskList);
  return out;
}

// incomingWait(handle, loadState: (state: Buffer) => string | undefined) -> true when told to
// run, false when livemig went away first. loadState returns why it refuses a state, if it does.
Napi::Value IncomingWait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Incoming* in = info[0].As<Napi::External<Incoming>>().Data();
  in->env = env;
  in->loadState = info[1].As<Napi::Function>();
  lmg_incoming_ops ops = {sizeof(lmg_incoming_ops), in, OnLoadState, OnAllPresent};
  char err[512];
  return Napi::Boolean::New(env, lmg_incoming_wait(in->h, &ops, err, sizeof err) == 0);
}

// incomingStatus(handle) -> {postcopy, allPresent}
Napi::Value IncomingStatus(const Napi::CallbackInfo& info) {
  Incoming* in = info[0].As<Napi::External<Incoming>>().Data();
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("postcopy", Napi::Boolean::New(info.Env(), lmg_incoming_postcopy(in->h) != 0));
  o.Set("allPresent", Napi::Boolean::New(info.Env(), in->allPresent.load()));
  return o;
}

}  // namespace

void InitGate(Napi::Env env, Napi::Object exports) {
  exports.Set("serve", Napi::Function::New(env, Serve));
  exports.Set("gatePaused", Napi::Function::New(env, GatePaused));
  exports.Set("gateThrottle", Napi::Function::New(env, GateThrottle));
  exports.Set("gateBeat", Napi::Function::New(env, GateBeat));
  exports.Set("incomingOpen", Napi::Function::New(env, IncomingOpen));
  exports.Set("incomingWait", Napi::Function::New(env, IncomingWait));
  exports.Set("incomingStatus", Napi::Function::New(env, IncomingStatus));
}

}  // namespace livemig
