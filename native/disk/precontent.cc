// fanotify pre-content events (Linux >= 6.14): a read or write of a marked file blocks, and the
// kernel tells the listener the exact range, until the listener answers. Marking the images and
// taking a descriptor that raises no event (src/disk/watch.ts), and probing the kernel
// (src/disk/probe.ts); the post-copy fault service answers the guest's accesses itself
// (native/postcopy/disk_waits.h).
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/fanotify.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "disk/fanotify.h"

namespace livemig {

namespace {

struct PrecontentEvent {
  int fd = -1;
  int pid = 0;
  uint64_t mask = 0;
  double offset = -1, count = -1;
};

int IntArg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a number");
  return info[i].As<Napi::Number>().Int32Value();
}

// precontentWatch(path, fan?) -> fanotify descriptor: reads and writes of the file at `path` wait
// for an answer from here from now on (with fan: one more file on that descriptor)
Napi::Value PrecontentWatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "precontentWatch(path, fan?)");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  const bool added = info.Length() > 1 && info[1].IsNumber();
  int fan =
      added ? info[1].As<Napi::Number>().Int32Value() : fanotify_init(FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK, O_RDWR | O_LARGEFILE | O_CLOEXEC);
  if (fan < 0) throw MakeSysError(env, "fanotify_init(FAN_CLASS_PRE_CONTENT)", errno);
  if (fanotify_mark(fan, FAN_MARK_ADD, FAN_PRE_ACCESS, AT_FDCWD, path.c_str()) != 0) {
    int e = errno;
    if (!added) close(fan);
    throw MakeSysError(env, "fanotify_mark(FAN_PRE_ACCESS)", e);
  }
  return Napi::Number::New(env, fan);
}

// precontentNextAsync(fan, timeoutMs) -> [{fd, pid, mask, offset, count}]: the events that came
// within the timeout (none: an empty list). Each must be answered (precontentRespond).
Napi::Value PrecontentNextAsync(const Napi::CallbackInfo& info) {
  int fan = IntArg(info, 0, "fan"), timeoutMs = IntArg(info, 1, "timeoutMs");
  return Task<std::vector<PrecontentEvent>>::Start(
      info.Env(),
      [fan, timeoutMs](std::vector<PrecontentEvent>& out, SysError& err) {
        pollfd p{fan, POLLIN, 0};
        int r = poll(&p, 1, timeoutMs);
        if (r < 0 && errno != EINTR) return err.set("poll(fanotify)", errno);
        if (r <= 0) return;
        alignas(fanotify_event_metadata) uint8_t buf[8192];
        ssize_t n = read(fan, buf, sizeof buf);
        if (n < 0) {
          if (errno != EAGAIN && errno != EINTR) err.set("read(fanotify)", errno);
          return;
        }
        for (auto* m = reinterpret_cast<fanotify_event_metadata*>(buf); FAN_EVENT_OK(m, n); m = FAN_EVENT_NEXT(m, n)) {
          if (m->vers != FANOTIFY_METADATA_VERSION) return err.set("read(fanotify)", EPROTO, "fanotify metadata version " + std::to_string(m->vers));
          PrecontentEvent e;
          e.fd = m->fd;
          e.pid = m->pid;
          e.mask = m->mask;
          for (size_t at = m->metadata_len; at + sizeof(fanotify_event_info_header) <= m->event_len;) {
            auto* h = reinterpret_cast<const fanotify_event_info_header*>(reinterpret_cast<uint8_t*>(m) + at);
            if (h->len == 0 || at + h->len > m->event_len) break;
            if (h->info_type == FAN_EVENT_INFO_TYPE_RANGE && h->len >= sizeof(FanRangeInfo)) {
              FanRangeInfo ri;
              std::memcpy(&ri, h, sizeof ri);
              e.offset = static_cast<double>(ri.offset);
              e.count = static_cast<double>(ri.count);
            }
            at += h->len;
          }
          out.push_back(e);
        }
      },
      [](Napi::Env e, std::vector<PrecontentEvent>& v) -> Napi::Value {
        Napi::Array a = Napi::Array::New(e, v.size());
        for (size_t i = 0; i < v.size(); i++) {
          Napi::Object o = Napi::Object::New(e);
          o.Set("fd", v[i].fd);
          o.Set("pid", v[i].pid);
          o.Set("mask", static_cast<double>(v[i].mask));
          o.Set("offset", v[i].offset);
          o.Set("count", v[i].count);
          a[i] = o;
        }
        return a;
      });
}

// precontentRespond(fan, eventFd, allow): the access waiting on the event goes on (allow) or
// fails with EIO; the event's descriptor is closed
Napi::Value PrecontentRespond(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fan = IntArg(info, 0, "fan"), fd = IntArg(info, 1, "eventFd");
  bool allow = info.Length() > 2 && info[2].ToBoolean().Value();
  if (int e = FanRespond(fan, fd, allow)) throw MakeSysError(env, "write(fanotify response)", e);
  return env.Undefined();
}

// precontentUnwatch(fan): the mark goes with the descriptor; an access still waiting is allowed
Napi::Value PrecontentUnwatch(const Napi::CallbackInfo& info) {
  close(IntArg(info, 0, "fan"));
  return info.Env().Undefined();
}

// precontentUnwatchAsync(fan): the same on a pool thread. Closing the descriptor lets every
// access through at once, then tears the group down, which waits for the marks' grace period
// (synchronize_srcu): milliseconds that must not fall inside a guest's pause.
Napi::Value PrecontentUnwatchAsync(const Napi::CallbackInfo& info) {
  int fan = IntArg(info, 0, "fan");
  return Task<int>::Start(
      info.Env(), [fan](int&, SysError&) { close(fan); }, [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); });
}

}  // namespace

void InitPrecontent(Napi::Env env, Napi::Object exports) {
  exports.Set("precontentWatch", Napi::Function::New(env, PrecontentWatch));
  exports.Set("precontentNextAsync", Napi::Function::New(env, PrecontentNextAsync));
  exports.Set("precontentRespond", Napi::Function::New(env, PrecontentRespond));
  exports.Set("precontentUnwatch", Napi::Function::New(env, PrecontentUnwatch));
  exports.Set("precontentUnwatchAsync", Napi::Function::New(env, PrecontentUnwatchAsync));
}

}  // namespace livemig
