// Post-copy, source: the page server (requests on the priority connection) and the background
// push, sharing a per-page claim so that each page goes once (see postcopy.cc).
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <pthread.h>
#include <sched.h>
#include "codec/pagehash.h"
#include "options.h"
#include "postcopy/postcopy.h"
#include "region/region.h"
#include "wire/wire.h"

namespace livemig {
namespace postcopy {

namespace {

// ---------------------------------------------------------------- source

class PostcopySource : public Napi::ObjectWrap<PostcopySource> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(
        env, "PostcopySource",
        {InstanceMethod("attach", &PostcopySource::Attach), InstanceMethod("push", &PostcopySource::Push), InstanceMethod("recent", &PostcopySource::Recent),
         InstanceMethod("reset", &PostcopySource::Reset), InstanceMethod("unsent", &PostcopySource::Unsent), InstanceMethod("stats", &PostcopySource::Stats),
         InstanceMethod("detach", &PostcopySource::Detach)});
  }

  // new PostcopySource({region, needed: Uint8Array (1: the destination needs the page), version,
  //                     round, hashes?: BigUint64Array (each page sent is hashed into it), onEvent})
  explicit PostcopySource(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PostcopySource>(info) {
    Napi::Env env = info.Env();
    Options o(info, "PostcopySource");
    Napi::Value region = o.Required("region");
    if (!Region::IsInstance(env, region)) throw o.Bad("region", "a NativeRegion");
    Napi::Uint8Array need = o.TypedArray<Napi::Uint8Array>("needed", napi_uint8_array, "Uint8Array");
    uint8_t version = static_cast<uint8_t>(o.Integer("version", 1, 255));
    uint32_t round = static_cast<uint32_t>(o.Integer("round", 0, UINT32_MAX));
    Napi::BigUint64Array h = o.OptionalTypedArray<Napi::BigUint64Array>("hashes", napi_biguint64_array, "BigUint64Array");
    Napi::Function onEvent = o.Function("onEvent");
    m_ = Region::Unwrap(region)->LiveMapping(env);
    if (!m_) return;
    pages_ = m_->size / kPage;
    if (need.ElementLength() != pages_)
      throw Napi::RangeError::New(
          env, o.Prefix("needed") + " must have one entry per page (" + std::to_string(pages_) + "), got " + std::to_string(need.ElementLength()));
    if (!h.IsEmpty() && h.ElementLength() != pages_)
      throw Napi::RangeError::New(
          env, o.Prefix("hashes") + " must have one entry per page (" + std::to_string(pages_) + "), got " + std::to_string(h.ElementLength()));
    m_->Ref();  // only now: a constructor that throws is not destroyed, and would keep it
    claim_.reset(new std::atomic<uint8_t>[pages_]);
    for (uint64_t p = 0; p < pages_; p++) claim_[p].store(need[p] ? kUnsent : kPushed, std::memory_order_relaxed);
    version_ = version;
    round_ = round;
    if (!h.IsEmpty()) {
      hashesRef_ = Napi::Persistent(h);
      hashes_ = h.Data();
    }
    events_.Init(env, onEvent, "livemig-postcopy-source");
  }

  ~PostcopySource() override {
    events_.Close();  // at exit the thread-safe function may be going away under us
    StopServer();
    if (m_) m_->Unref();
  }

 private:
  // attach(push: Wire, prio: Wire): takes both connections over from their Wires (blocking
  // descriptors, records in sequence) and starts the page server on the priority one
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    std::shared_ptr<Link> push = LinkOfWire(info.Env(), info[0]), prio = LinkOfWire(info.Env(), info[1]);
    StopServer();
    push_ = push;
    prio_ = prio;
    uint32_t gen = ++generation_;
    server_ = std::thread([this, prio, gen] { Serve(*prio, gen); });
    return info.Env().Undefined();
  }

  void StopServer() {
    if (prio_) shutdown(prio_->fd(), SHUT_RDWR);
    if (server_.joinable()) server_.join();
    prio_.reset();
    if (push_) {
      shutdown(push_->fd(), SHUT_RDWR);
      push_.reset();  // closed by the last push() still holding it
    }
  }

  Napi::Value Detach(const Napi::CallbackInfo& info) {
    StopServer();
    return info.Env().Undefined();
  }

  // Sends the pages of `pages` no one has sent yet, in PAGES frames of `batch` pages.
  // Resolves to {pages, bytes}.
  Napi::Value Push(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!push_) throw Napi::Error::New(env, "not attached");
    Napi::Uint32Array list = info[0].As<Napi::Uint32Array>();
    uint32_t batch = info[1].As<Napi::Number>().Uint32Value();
    if (batch == 0 || batch > kMaxBatch) throw Napi::RangeError::New(env, "batch must be 1..4096 pages");
    for (size_t k = 0; k < list.ElementLength(); k++)
      if (list[k] >= pages_) throw Napi::RangeError::New(env, "page index outside the region");
    auto link = push_;
    const uint32_t* idx = list.Data();
    size_t count = list.ElementLength();
    Mapping* m = m_;
    m->Ref();
    struct Out {
      double pages = 0, bytes = 0;
    };
    return Task<Out>::Start(
        env,
        [this, link, idx, count, batch, m](Out& o, SysError& err) {
          std::vector<uint32_t> mine;
          std::vector<uint8_t> head;
          std::vector<iovec> iov;
          for (size_t at = 0; at < count && !err.failed();) {
            mine.clear();
            for (; at < count && mine.size() < batch; at++) {
              uint8_t expect = kUnsent;
              if (claim_[idx[at]].compare_exchange_strong(expect, kPushing)) mine.push_back(idx[at]);
            }
            if (mine.empty()) continue;
            std::sort(mine.begin(), mine.end());  // a frame's indices are strictly increasing (wire/format.h)
            uint32_t n = static_cast<uint32_t>(mine.size());
            if (!SendPagesFrame(*link, m->addr, mine, head, iov, err)) {
              // not known to have arrived: the destination's list after reconnecting decides
              for (uint32_t p : mine) claim_[p].store(kUnsent);
              break;
            }
            for (uint32_t p : mine) {
              if (hashes_) hashes_[p] = PageHash(m->addr + uint64_t{p} * kPage, kPage);  // just sent, still in cache
              claim_[p].store(kPushed);
            }
            o.pages += n;
            o.bytes += static_cast<double>(head.size() + size_t{n} * kPage);
            pushedPages_ += n;
          }
          m->Unref();
        },
        [](Napi::Env e, Out& o) -> Napi::Value {
          Napi::Object r = Napi::Object::New(e);
          r.Set("pages", o.pages);
          r.Set("bytes", o.bytes);
          return r;
        },
        {info[0]});
  }

  // pages the destination asked for since the last call (for pre-paging)
  Napi::Value Recent(const Napi::CallbackInfo& info) {
    std::vector<uint32_t> r;
    {
      std::lock_guard<std::mutex> g(mu_);
      r.swap(recent_);
    }
    return PagesToJs(info.Env(), std::move(r));
  }

  // reset(pages: Uint8Array, meaning: 'held' | 'needed'): 'held' after a reconnection (what
  // the destination holds is sent never again, what it lacks is unsent, whoever had claimed
  // it); 'needed' at the switch (what it must get is unsent, the rest it has)
  Napi::Value Reset(const Napi::CallbackInfo& info) {
    Napi::Uint8Array held = info[0].As<Napi::Uint8Array>();
    bool needed = info[1].IsString() && info[1].As<Napi::String>().Utf8Value() == "needed";
    if (held.ElementLength() != pages_) throw Napi::RangeError::New(info.Env(), "the page array must have one entry per page");
    for (uint64_t p = 0; p < pages_; p++) claim_[p].store((held[p] != 0) != needed ? kPushed : kUnsent);
    return info.Env().Undefined();
  }

  // the pages still unsent, in order
  Napi::Value Unsent(const Napi::CallbackInfo& info) {
    std::vector<uint32_t> r;
    for (uint64_t p = 0; p < pages_; p++)
      if (claim_[p].load(std::memory_order_relaxed) == kUnsent) r.push_back(static_cast<uint32_t>(p));
    return PagesToJs(info.Env(), std::move(r));
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("requests", static_cast<double>(requests_.load()));
    o.Set("served", static_cast<double>(served_.load()));
    o.Set("pushed", static_cast<double>(pushedPages_.load()));
    o.Set("servedBytes", static_cast<double>(servedBytes_.load()));
    o.Set("resent", static_cast<double>(resent_.load()));
    return o;
  }

  void Emit(Event* e) { events_.Emit(e); }

  // One PAGES frame of `pages` (ascending), bodies straight from the region. `head` and `iov`
  // are the caller's scratch.
  bool SendPagesFrame(Link& link, const uint8_t* base, const std::vector<uint32_t>& pages, std::vector<uint8_t>& head, std::vector<iovec>& iov, SysError& err) {
    uint32_t n = static_cast<uint32_t>(pages.size());
    head.resize(kHeader + 8 + 4 * size_t{n});
    wire::PutPagesHead(head.data(), version_, kPages, 8 + uint64_t{n} * (4 + kPage), round_, n);
    for (uint32_t k = 0; k < n; k++) Put32(&head[kHeader + 8 + 4 * k], pages[k]);
    iov.clear();
    iov.push_back({head.data(), head.size()});
    PageIovecs(const_cast<uint8_t*>(base), pages.data(), n, iov);
    return link.Send(iov.data(), static_cast<int>(iov.size()), head.size(), err);
  }

  // The page server: reads requests, answers each with the pages no one has sent yet.
  void Serve(Link& link, uint32_t gen) {
    // a fault at the destination waits on this thread: it must run the moment a request comes,
    // ahead of the background push (real-time FIFO when allowed: it only ever sends a few pages
    // and sleeps; else nice -10)
    sched_param sp{};
    sp.sched_priority = 1;
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) != 0) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), -10);
    SysError err;
    uint8_t h[kHeader];
    std::vector<uint8_t> body, head;
    std::vector<uint32_t> mine, claimed;
    std::vector<iovec> iov;
    for (;;) {
      if (!link.RecvBytes(h, kHeader, true, err)) break;
      uint8_t type;
      uint32_t length;
      if (!CheckHeader(h, version_, &type, &length, err)) break;
      if (type == kComplete) {
        if (length != 12) {
          err.fail("ERR_LIVEMIG_PROTOCOL", "post-copy COMPLETE of the wrong length");
          break;
        }
        uint8_t c[12];
        if (!link.RecvBytes(c, 12, false, err)) break;
        if (Le32(c + 8) != pages_) {
          err.fail("ERR_LIVEMIG_PROTOCOL", "post-copy COMPLETE for another page count");
          break;
        }
        Event* e = new Event{"complete", "", ""};
        std::memcpy(&e->digest, c, 8);
        e->generation = gen;
        Emit(e);
        return;
      }
      if (type != kRequest || length < 4 || length > 4 + 4 * kMaxBatch || length % 4 != 0) {
        err.fail("ERR_LIVEMIG_PROTOCOL",
                 "unexpected frame type " + std::to_string(type) + " (" + std::to_string(length) + " bytes) on the page-request connection");
        break;
      }
      body.resize(length);
      if (!link.RecvBytes(body.data(), length, false, err)) break;
      uint32_t n = Le32(body.data());
      if (n == 0 || length != 4 + 4 * uint64_t{n}) {
        err.fail("ERR_LIVEMIG_PROTOCOL", "page request count does not match its length");
        break;
      }
      mine.clear();
      claimed.clear();
      {
        std::lock_guard<std::mutex> g(mu_);
        for (uint32_t k = 0; k < n; k++) {
          uint32_t p = Le32(&body[4 + 4 * k]);
          if (p >= pages_) {
            err.fail("ERR_LIVEMIG_PAGE_INDEX", "page request for " + std::to_string(p) + ", outside the region");
            break;
          }
          requests_++;
          if (recent_.size() < 65536) recent_.push_back(p);
          uint8_t expect = kUnsent;
          // Unsent: it goes now, and the push skips it. Already pushed (or being pushed): it goes
          // again here all the same, since the push's copy may sit behind megabytes of the push
          // stream (milliseconds at 1 GB/s) while a guest thread waits on it; the destination
          // keeps whichever copy lands first (both are the paused source's same bytes).
          if (claim_[p].compare_exchange_strong(expect, kServed)) claimed.push_back(p);
          else if (expect != kServed) resent_++;
          else continue;  // asked again after a reconnect: the first answer is on its way or there
          mine.push_back(p);
        }
      }
      if (err.failed()) break;
      if (mine.empty()) continue;
      std::sort(mine.begin(), mine.end());
      mine.erase(std::unique(mine.begin(), mine.end()), mine.end());
      uint32_t m = static_cast<uint32_t>(mine.size());
      if (!SendPagesFrame(link, m_->addr, mine, head, iov, err)) {
        for (uint32_t p : claimed) claim_[p].store(kUnsent);
        break;
      }
      // only what this thread claimed: a page the push claimed is hashed by the push
      if (hashes_)
        for (uint32_t p : claimed) hashes_[p] = PageHash(m_->addr + uint64_t{p} * kPage, kPage);
      served_ += m;
      servedBytes_ += head.size() + size_t{m} * kPage;
    }
    bool protocol = err.code == "ERR_LIVEMIG_PROTOCOL" || err.code == "ERR_LIVEMIG_PAGE_INDEX" || err.code == "ERR_LIVEMIG_VERSION";
    Event* e = new Event{protocol ? "error" : "disconnected", err.detail.empty() ? err.syscall + ": " + std::strerror(err.err) : err.detail, err.code};
    e->generation = gen;
    Emit(e);
  }

  Mapping* m_ = nullptr;
  uint64_t pages_ = 0;
  uint8_t version_ = 0;
  uint32_t round_ = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> claim_;
  std::shared_ptr<Link> push_, prio_;
  std::thread server_;
  std::mutex mu_;
  std::vector<uint32_t> recent_;
  std::atomic<uint64_t> requests_{0}, served_{0}, pushedPages_{0}, servedBytes_{0}, resent_{0};
  uint32_t generation_ = 0;
  uint64_t* hashes_ = nullptr;  // a page is hashed by whichever thread sent it (one per page)
  Napi::Reference<Napi::BigUint64Array> hashesRef_;
  EventSink events_;
};

}  // namespace

Napi::Function SourceClass(Napi::Env env) { return PostcopySource::Init(env); }

}  // namespace postcopy
}  // namespace livemig
