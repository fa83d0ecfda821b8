// The reference guest's disk: the example guests' checkable disk (native/guest/example/
// example_disk.h), its writes passing the same gate as the memory's, so that a pause leaves no
// disk write in flight and the state it answers with names the last one.
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>

#include "common.h"
#include "guest/example/example_disk.h"
#include "refguest/gate.h"

namespace livemig {

namespace {
example_disk g_disk{};
bool g_hasDisk = false;
}  // namespace

example_disk* TheGuestDisk() { return g_hasDisk ? &g_disk : nullptr; }

namespace {

void Need(const Napi::CallbackInfo& info) {
  if (!g_hasDisk) throw Napi::Error::New(info.Env(), "the guest has no disk");
}

// diskCreate(path, size, seed, track): the image created with the example layout, and (track)
// its written-block bitmap shared with livemig
Napi::Value DiskCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (g_hasDisk) throw Napi::Error::New(env, "the guest has a disk already");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  char err[512];
  if (example_disk_create(&g_disk, path.c_str(), "disk0", ToU64(info[1]), ToU64(info[2]), err, sizeof err) != 0) throw Napi::Error::New(env, err);
  g_hasDisk = true;
  if (info[3].ToBoolean().Value() && lmg_disk_track(&g_disk.d, err, sizeof err) != 0) throw Napi::Error::New(env, err);
  return env.Undefined();
}

// diskAdopt(fd, size, name, seed, xs, writes): a disk livemig handed over, where the source's stream stopped
Napi::Value DiskAdopt(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (g_hasDisk) throw Napi::Error::New(env, "the guest has a disk already");
  std::memset(&g_disk, 0, sizeof g_disk);
  g_disk.d.fd = info[0].As<Napi::Number>().Int32Value();
  g_disk.d.size = ToU64(info[1]);
  std::snprintf(g_disk.d.name, sizeof g_disk.d.name, "%s", info[2].As<Napi::String>().Utf8Value().c_str());
  g_disk.d.written_fd = -1;
  g_disk.seed = ToU64(info[3]);
  g_disk.xs = ToU64(info[4]);
  g_disk.writes = ToU64(info[5]);
  g_hasDisk = true;
  return env.Undefined();
}

// diskTrack(): the bitmap, for a guest that arrived and serves livemig again
Napi::Value DiskTrack(const Napi::CallbackInfo& info) {
  Need(info);
  char err[512];
  if (lmg_disk_track(&g_disk.d, err, sizeof err) != 0) throw Napi::Error::New(info.Env(), err);
  return info.Env().Undefined();
}

// diskWrite(n) -> writes made: n blocks, through the gate (none while paused)
Napi::Value DiskWrite(const Napi::CallbackInfo& info) {
  Need(info);
  GuestGate& g = TheGuestGate();
  int64_t n = info[0].As<Napi::Number>().Int64Value(), done = 0;
  for (; done < n; done++) {
    if (g.pausing) break;
    std::lock_guard<std::mutex> lock(g.mu);
    if (g.paused) break;
    if (example_disk_write(&g_disk) != 0) throw MakeSysError(info.Env(), "pwrite (the guest's disk)", errno);
  }
  return Napi::Number::New(info.Env(), static_cast<double>(done));
}

// diskState() -> {xs, writes}
Napi::Value DiskState(const Napi::CallbackInfo& info) {
  Need(info);
  std::lock_guard<std::mutex> lock(TheGuestGate().mu);
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("xs", Napi::BigInt::New(info.Env(), g_disk.xs));
  o.Set("writes", Napi::BigInt::New(info.Env(), g_disk.writes));
  return o;
}

struct CheckResult {
  struct example_disk_check c {};
};

// diskCheck() -> Promise<{bad, firstBad, blocks}>: every block against the model, at the lowest priority
Napi::Value DiskCheck(const Napi::CallbackInfo& info) {
  Need(info);
  example_disk snapshot = g_disk;
  return Task<CheckResult>::Start(
      info.Env(),
      [snapshot](CheckResult& r, SysError& err) {
        pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
        int before = getpriority(PRIO_PROCESS, tid);
        setpriority(PRIO_PROCESS, tid, 19);
        if (example_disk_check(&snapshot, &r.c) != 0) err.set("reading the guest's disk", errno);
        setpriority(PRIO_PROCESS, tid, before);
      },
      [](Napi::Env e, CheckResult& r) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        o.Set("bad", static_cast<double>(r.c.bad));
        o.Set("firstBad", static_cast<double>(r.c.first_bad));
        o.Set("blocks", static_cast<double>(r.c.read));
        return o;
      });
}

}  // namespace

void InitDisk(Napi::Env env, Napi::Object exports) {
  exports.Set("diskCreate", Napi::Function::New(env, DiskCreate));
  exports.Set("diskAdopt", Napi::Function::New(env, DiskAdopt));
  exports.Set("diskTrack", Napi::Function::New(env, DiskTrack));
  exports.Set("diskWrite", Napi::Function::New(env, DiskWrite));
  exports.Set("diskState", Napi::Function::New(env, DiskState));
  exports.Set("diskCheck", Napi::Function::New(env, DiskCheck));
}

}  // namespace livemig
