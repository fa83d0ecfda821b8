// Scheduling hints for latency-critical threads. On EEVDF (Linux >= 6.12) a fair-class thread
// may ask for a shorter slice: its virtual deadline comes sooner, so when it wakes (a control
// message, a pause request) it preempts a thread running a long slice instead of waiting for
// that slice to end (~1.5 ms on a 2-CPU host, measured as 2 ms wake-up delays at hand-over).
#include <dirent.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "common.h"
#include "refguest/gate.h"

namespace livemig {
namespace {

struct SchedAttr {
  uint32_t size;
  uint32_t policy;
  uint64_t flags;
  int32_t nice;
  uint32_t priority;
  uint64_t runtime;  // for SCHED_OTHER since 6.12: the requested slice in ns
  uint64_t deadline;
  uint64_t period;
};

// The slice the kernel applies to a thread, from /proc; 0 when the field is not there (a
// kernel without custom slices reports none, or ignores the request).
uint64_t ReadSlice(pid_t tid) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/sched", tid);
  FILE* f = std::fopen(path, "r");
  if (!f) return 0;
  char line[256];
  uint64_t slice = 0;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "se.slice", 8) == 0) {
      const char* colon = std::strchr(line, ':');
      if (colon) slice = std::strtoull(colon + 1, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return slice;
}

}  // namespace

// Asks for `ns`-long slices (0: the default) for the calling thread only; false when the
// kernel refused. For a thread that only waits for control messages and must answer at once.
bool SetThreadSlice(uint64_t ns) {
  pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
  int policy = sched_getscheduler(tid);
  if (policy != SCHED_OTHER && policy != SCHED_BATCH) return false;
  errno = 0;
  int nice = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
  if (errno != 0) return false;
  SchedAttr a{};
  a.size = sizeof a;
  a.policy = static_cast<uint32_t>(policy);
  a.nice = nice;
  a.runtime = ns;
  return syscall(SYS_sched_setattr, tid, &a, 0) == 0;
}

bool MayLeaveIdle() {
  if (geteuid() == 0) return true;
  // an unprivileged thread leaves SCHED_IDLE only for a nice value its RLIMIT_NICE allows
  rlimit r{};
  if (getrlimit(RLIMIT_NICE, &r) != 0) return false;
  errno = 0;
  int nice = getpriority(PRIO_PROCESS, 0);
  return errno == 0 && r.rlim_cur != RLIM_INFINITY ? static_cast<int>(r.rlim_cur) >= 20 - nice : errno == 0;
}

uint32_t SetOtherThreadsIdle(bool idle) {
  pid_t self = static_cast<pid_t>(syscall(SYS_gettid));
  DIR* dir = opendir("/proc/self/task");
  if (!dir) return 0;
  uint32_t changed = 0;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    pid_t tid = static_cast<pid_t>(std::atoi(e->d_name));
    if (tid == self) continue;
    int policy = sched_getscheduler(tid);
    // only fair-class threads move, and back only those this moved (no other thread here runs
    // SCHED_IDLE on purpose); ESRCH (ended meanwhile) shows as -1 and is skipped
    if (idle ? policy != SCHED_OTHER && policy != SCHED_BATCH : policy != SCHED_IDLE) continue;
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
    if (errno != 0) continue;
    SchedAttr a{};
    a.size = sizeof a;
    a.policy = idle ? SCHED_IDLE : SCHED_OTHER;
    a.nice = nice;
    if (syscall(SYS_sched_setattr, tid, &a, 0) == 0) changed++;
  }
  closedir(dir);
  return changed;
}

namespace {

Napi::Value SetThreadSliceJs(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), SetThreadSlice(ToU64(info[0]))); }

Napi::Object ResultObject(Napi::Env env, uint32_t threads, bool applied) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("threads", Napi::Number::New(env, threads));
  o.Set("applied", Napi::Boolean::New(env, applied && threads > 0));
  return o;
}

// setShortSlices(ns): every fair-class thread of this process (and, by inheritance, threads
// and processes it creates later) asks for slices of `ns`; 0 goes back to the kernel's default
// slice. Real-time threads are left alone.
// Returns {threads, applied}: applied is false when the kernel did not take the request.
Napi::Value SetShortSlices(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t ns = ToU64(info[0]);
  DIR* dir = opendir("/proc/self/task");
  if (!dir) throw MakeSysError(env, "opendir", errno, "/proc/self/task");
  uint32_t threads = 0;
  bool applied = true;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    pid_t tid = static_cast<pid_t>(std::atoi(e->d_name));
    int policy = sched_getscheduler(tid);
    if (policy < 0) continue;  // ESRCH: the thread ended meanwhile
    if (policy != SCHED_OTHER && policy != SCHED_BATCH) continue;
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, static_cast<id_t>(tid));
    if (errno != 0) continue;  // ESRCH again
    SchedAttr a{};
    a.size = sizeof a;
    a.policy = static_cast<uint32_t>(policy);
    a.nice = nice;
    a.runtime = ns;
    if (syscall(SYS_sched_setattr, tid, &a, 0) != 0) {
      int err = errno;
      if (err == ESRCH) continue;  // ended meanwhile
      closedir(dir);
      // EINVAL: a kernel that refuses a runtime for the fair class; EPERM: not allowed
      if (err == EINVAL || err == EPERM) return ResultObject(env, threads, false);
      throw MakeSysError(env, "sched_setattr", err);
    }
    if (ns != 0 && ReadSlice(tid) != ns) applied = false;
    threads++;
  }
  closedir(dir);
  return ResultObject(env, threads, applied);
}

// ignoreStopSignals(): SIGTERM, SIGINT and SIGHUP are ignored by the kernel from now on. A
// daemon that has begun its shutdown calls it: a second signal (a service manager signals the
// whole group, and the parent that sized the pool passes its own on) may otherwise land while
// Node tears the process down, its handlers gone, and end it by the signal's default action.
Napi::Value IgnoreStopSignals(const Napi::CallbackInfo& info) {
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) {
    struct sigaction a {};
    a.sa_handler = SIG_IGN;
    sigemptyset(&a.sa_mask);
    if (sigaction(sig, &a, nullptr) != 0) throw MakeSysError(info.Env(), "sigaction", errno);
  }
  return info.Env().Undefined();
}

// exitNow(code): ends the process at once, without Node's teardown. A daemon whose shutdown is
// complete calls it: the teardown closes libuv's signal handles, which sets their signals back to
// the default action, and a stop signal landing then (the parent's, or a service manager's sent
// to every process of the unit) ended it by that action instead of its exit code.
Napi::Value ExitNow(const Napi::CallbackInfo& info) { _exit(info[0].As<Napi::Number>().Int32Value()); }

// idleProcess(pid): every fair-class thread of process `pid` (0: this one) goes to SCHED_IDLE:
// it runs only on a CPU nothing else wants. Returns how many threads moved. For a process whose
// remaining work is teardown (a source VMM that quits once its guest runs elsewhere).
Napi::Value IdleProcess(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t pid = info[0].As<Napi::Number>().Int64Value();
  char path[64];
  if (pid == 0) std::snprintf(path, sizeof path, "/proc/self/task");
  else std::snprintf(path, sizeof path, "/proc/%lld/task", static_cast<long long>(pid));
  DIR* dir = opendir(path);
  if (!dir) throw MakeSysError(env, "opendir", errno, path);
  uint32_t threads = 0;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    pid_t tid = static_cast<pid_t>(std::atoi(e->d_name));
    int policy = sched_getscheduler(tid);
    if (policy != SCHED_OTHER && policy != SCHED_BATCH) continue;  // -1: ended meanwhile; real-time: left alone
    SchedAttr a{};
    a.size = sizeof a;
    a.policy = SCHED_IDLE;
    if (syscall(SYS_sched_setattr, tid, &a, 0) != 0) {
      int err = errno;
      if (err == ESRCH) continue;
      closedir(dir);
      throw MakeSysError(env, "sched_setattr(SCHED_IDLE)", err);
    }
    threads++;
  }
  closedir(dir);
  return Napi::Number::New(env, threads);
}

}  // namespace

void InitSched(Napi::Env env, Napi::Object exports) {
  exports.Set("ignoreStopSignals", Napi::Function::New(env, IgnoreStopSignals));
  exports.Set("exitNow", Napi::Function::New(env, ExitNow));
  exports.Set("setShortSlices", Napi::Function::New(env, SetShortSlices));
  exports.Set("setThreadSlice", Napi::Function::New(env, SetThreadSliceJs));
  exports.Set("idleProcess", Napi::Function::New(env, IdleProcess));
}

}  // namespace livemig
