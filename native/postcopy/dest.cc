// Post-copy, destination: the fault service (see postcopy.cc for the design). One native thread
// owns the guest's userfaultfd and both post-copy connections, so the per-page state needs no
// locks: missing -> requested (a fault waits) -> mapped, or missing -> arrived -> mapped.
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

#include "codec/pagehash.h"
#include "options.h"
#include "postcopy/disk_waits.h"
#include "postcopy/postcopy.h"
#include "region/region.h"
#include "wire/wire.h"

namespace livemig {

uint64_t DigestHashes(const uint64_t* hashes, size_t count);

namespace postcopy {

namespace {

// ---------------------------------------------------------------- destination

// Incremental reader of PAGES frames from a non-blocking socket: waits for exactly the bytes
// each part needs (header, prefix, indices, bodies); bodies land in the region when the page
// may still be written, in a scratch page otherwise.
struct PageReader {
  int phase = 0;  // 0 header, 1 prefix, 2 indices, 3 bodies
  uint8_t head[kHeader + 8];
  size_t got = 0;
  uint32_t count = 0, at = 0;  // pages in the frame; next page's body
  size_t off = 0;              // bytes of page `at` already received
  std::vector<uint32_t> idx;
  std::vector<uint8_t> toRegion;
  void Reset() { phase = 0, got = 0, count = 0, at = 0, off = 0; }
};

class PostcopyDest : public Napi::ObjectWrap<PostcopyDest> {
  struct GuestRange {
    uint64_t address;  // of the region's mapping in the guest
    uint32_t first, pages;
  };

 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(
        env, "PostcopyDest",
        {InstanceMethod("start", &PostcopyDest::Start), InstanceMethod("attach", &PostcopyDest::Attach), InstanceMethod("stats", &PostcopyDest::Stats),
         InstanceMethod("latencies", &PostcopyDest::Latencies), InstanceMethod("diskLatencies", &PostcopyDest::DiskLatencies),
         InstanceMethod("held", &PostcopyDest::Held), InstanceMethod("stop", &PostcopyDest::Stop)});
  }

  // new PostcopyDest({region, uffd, guest: bigint address | [{address, firstPage, pages}],
  //                   needed: Uint8Array (1: must come from the source, 2: a hole, nothing to map), hashes: BigUint64Array,
  //                   version, onEvent, fanotify?, diskAsks?, disks?: [{firstPage, pages, dev, ino}]})
  // With disks, the guest ranges cover the memory's pages and the disks the rest, in order; the
  // fanotify descriptor has every disk image marked for pre-content events, and the VMM asks for
  // blocks on diskAsks (the service's end of a SOCK_SEQPACKET pair: disk_waits.h).
  explicit PostcopyDest(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PostcopyDest>(info) {
    Napi::Env env = info.Env();
    Options o(info, "PostcopyDest");
    Napi::Value region = o.Required("region");
    if (!Region::IsInstance(env, region)) throw o.Bad("region", "a NativeRegion");
    int32_t uffd = static_cast<int32_t>(o.Integer("uffd", 0, INT32_MAX));
    Napi::Value guest = o.Required("guest");
    Napi::Uint8Array st = o.TypedArray<Napi::Uint8Array>("needed", napi_uint8_array, "Uint8Array");
    Napi::BigUint64Array h = o.TypedArray<Napi::BigUint64Array>("hashes", napi_biguint64_array, "BigUint64Array");
    uint8_t version = static_cast<uint8_t>(o.Integer("version", 1, 255));
    Napi::Function onEvent = o.Function("onEvent");
    m_ = Region::Unwrap(region)->LiveMapping(env);
    if (!m_) return;
    pages_ = m_->size / kPage;
    uffd_ = uffd;
    uint64_t guestPages = pages_;
    if (info[0].As<Napi::Object>().Has("disks")) {
      Napi::Array a = o.Required("disks").As<Napi::Array>();
      // the images' accesses wait on fanotify, the VMM's asks on their socket: one or both
      const bool fanotify = !o.Optional("fanotify").IsUndefined(), asks = !o.Optional("diskAsks").IsUndefined();
      if (!fanotify && !asks) throw o.Bad("disks", "given with a fanotify descriptor, a diskAsks socket, or both");
      int32_t fan = fanotify ? static_cast<int32_t>(o.Integer("fanotify", 0, INT32_MAX)) : -1;
      if (asks) disks_.InitAsks(static_cast<int32_t>(o.Integer("diskAsks", 0, INT32_MAX)));
      std::vector<DiskRange> disks;
      for (uint32_t i = 0; i < a.Length(); i++) {
        Napi::Object d = a.Get(i).As<Napi::Object>();
        disks.push_back({d.Get("firstPage").As<Napi::Number>().Uint32Value(), d.Get("pages").As<Napi::Number>().Uint32Value(),
                         static_cast<uint64_t>(d.Get("dev").As<Napi::Number>().Int64Value()),
                         static_cast<uint64_t>(d.Get("ino").As<Napi::Number>().Int64Value())});
      }
      if (disks.empty()) throw o.Bad("disks", "a non-empty list");
      uint64_t at = disks.front().first;
      guestPages = at;
      for (const DiskRange& d : disks) {
        if (d.first != at || d.pages == 0) throw Napi::RangeError::New(env, o.Prefix("disks") + ": the disks must follow the memory in order");
        at += d.pages;
      }
      if (at != pages_) throw Napi::RangeError::New(env, o.Prefix("disks") + ": the disks must end the page space");
      disks_.Init(fan, std::move(disks));
    }
    guestPages_ = static_cast<uint32_t>(guestPages);
    // where each region is mapped in the guest: one address (one region), or
    // [{address, firstPage, pages}] covering every page in order
    if (guest.IsArray()) {
      Napi::Array a = guest.As<Napi::Array>();
      uint64_t next = 0;
      for (uint32_t i = 0; i < a.Length(); i++) {
        Napi::Value e = a.Get(i);
        Napi::Value address = e.IsObject() ? e.As<Napi::Object>().Get("address") : env.Undefined();
        Napi::Value first = e.IsObject() ? e.As<Napi::Object>().Get("firstPage") : env.Undefined();
        Napi::Value count = e.IsObject() ? e.As<Napi::Object>().Get("pages") : env.Undefined();
        if (!(address.IsBigInt() || address.IsNumber()) || !first.IsNumber() || !count.IsNumber()) {
          throw o.Bad("guest", "a bigint address or an array of {address: bigint, firstPage: number, pages: number}");
        }
        GuestRange r{ToU64(address), first.As<Napi::Number>().Uint32Value(), count.As<Napi::Number>().Uint32Value()};
        if (r.first != next || r.pages == 0 || r.address % kPage)
          throw Napi::RangeError::New(env, o.Prefix("guest") + ": the ranges must cover the pages in order, page-aligned");
        next += r.pages;
        ranges_.push_back(r);
      }
      if (next != guestPages) throw Napi::RangeError::New(env, o.Prefix("guest") + ": the ranges must cover every page of the memory");
    } else if (guest.IsBigInt() || guest.IsNumber()) {
      ranges_.push_back(GuestRange{ToU64(guest), 0, static_cast<uint32_t>(guestPages)});
    } else {
      throw o.Bad("guest", "a bigint address or an array of {address, firstPage, pages}");
    }
    if (st.ElementLength() != pages_)
      throw Napi::RangeError::New(
          env, o.Prefix("needed") + " must have one entry per page (" + std::to_string(pages_) + "), got " + std::to_string(st.ElementLength()));
    if (h.ElementLength() != pages_)
      throw Napi::RangeError::New(
          env, o.Prefix("hashes") + " must have one entry per page (" + std::to_string(pages_) + "), got " + std::to_string(h.ElementLength()));
    m_->Ref();  // only now: a constructor that throws is not destroyed, and would keep it
    // the caller's array becomes the state table (no copy: this runs inside the guest's pause,
    // where first touches of fresh memory cost ~15 us per 4 KiB page on this host)
    stateRef_ = Napi::Persistent(st);
    state_ = st.Data();
    // locals only: a store through a uint8_t* may alias any member, which kept this loop from
    // being vectorised and cost ~0.8 ms of the pause for 1 GiB
    uint8_t* st8 = state_;
    uint64_t arrived = 0;
    // 0: held from pre-copy (mapped into the guest a run at a time); 1: must come from the
    // source; 2: a hole neither side holds data for, which the guest reads as zero with no
    // fault of ours (nothing to map: a CONTINUE there would find no page)
    for (uint64_t p = 0; p < pages_; p++) {
      uint8_t v = st8[p] == 1 ? kMissing : st8[p] == 2 ? kMapped : kArrived;
      st8[p] = v;
      arrived += v != kMissing;
    }
    arrived_ = arrived;
    hashesRef_ = Napi::Persistent(h);
    hashes_ = h.Data();
    version_ = version;
    events_.Init(env, onEvent, "livemig-postcopy-dest");
    wake_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_ < 0) throw MakeSysError(env, "eventfd", errno);
  }

  ~PostcopyDest() override {
    events_.Close();  // at exit the thread-safe function may be going away under us
    Shutdown();
    if (wake_ >= 0) close(wake_);
    if (m_) m_->Unref();
  }

 private:
  Napi::Value Start(const Napi::CallbackInfo& info) {
    if (thread_.joinable()) throw Napi::Error::New(info.Env(), "the fault service is already running");
    thread_ = std::thread([this] { Run(); });
    return info.Env().Undefined();
  }

  // attach(push: Wire, prio: Wire): the thread takes both connections over from their Wires
  // (new connections after a break), their descriptors made non-blocking
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    std::shared_ptr<Link> push = LinkOfWire(info.Env(), info[0]), prio = LinkOfWire(info.Env(), info[1]);
    for (int fd : {push->fd(), prio->fd()}) {
      int fl = fcntl(fd, F_GETFL);
      if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) throw MakeSysError(info.Env(), "fcntl(F_SETFL)", errno);
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      newPush_ = push, newPrio_ = prio;
      newGen_ = ++attachments_;
    }
    Wake();
    // which attachment this is: a 'disconnected' event names the one that broke, so that the
    // break of connections already replaced is not taken for one of these
    return Napi::Number::New(info.Env(), newGen_);
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("faults", static_cast<double>(faults_.load()));
    o.Set("faultsLocal", static_cast<double>(faultsLocal_.load()));
    o.Set("pulled", static_cast<double>(pulled_.load()));
    o.Set("pushed", static_cast<double>(pushed_.load()));
    o.Set("duplicates", static_cast<double>(duplicates_.load()));
    o.Set("arrived", static_cast<double>(arrivedShared_.load()));
    o.Set("blockedMs", static_cast<double>(blockedNs_.load()) / 1e6);
    o.Set("bytes", static_cast<double>(bytes_.load()));
    o.Set("connected", connected_.load());
    o.Set("diskAccesses", static_cast<double>(disks_.accesses()));
    o.Set("diskAccessesWaited", static_cast<double>(disks_.accessesWaited()));
    o.Set("diskFetches", static_cast<double>(disks_.fetches()));
    o.Set("diskOverwrites", static_cast<double>(disks_.overwrites()));
    o.Set("diskPagesClaimed", static_cast<double>(disks_.pagesClaimed()));
    return o;
  }

  // fault latencies so far (ns, in the order served)
  Napi::Value Latencies(const Napi::CallbackInfo& info) {
    std::lock_guard<std::mutex> g(mu_);
    Napi::Float64Array a = Napi::Float64Array::New(info.Env(), latencies_.size());
    for (size_t k = 0; k < latencies_.size(); k++) a[k] = static_cast<double>(latencies_[k]);
    return a;
  }

  // how long each guest access to a disk waited for blocks that had to come (ns, in the order answered)
  Napi::Value DiskLatencies(const Napi::CallbackInfo& info) {
    std::vector<uint64_t> l = disks_.Latencies();
    Napi::Float64Array a = Napi::Float64Array::New(info.Env(), l.size());
    for (size_t k = 0; k < l.size(); k++) a[k] = static_cast<double>(l[k]);
    return a;
  }

  // 1 for each page the destination holds. Read while the thread may run: a page becomes held
  // only when its body has arrived, which needs a connection, and this is asked for between
  // connections; a byte read racing a store sees the old or the new state, both valid.
  Napi::Value Held(const Napi::CallbackInfo& info) {
    Napi::Uint8Array a = Napi::Uint8Array::New(info.Env(), pages_);
    // a claimed block is the guest's, but its source copy (and hash) has yet to come
    for (uint64_t p = 0; p < pages_; p++) a[p] = IsHeld(__atomic_load_n(&state_[p], __ATOMIC_RELAXED)) ? 1 : 0;
    return a;
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  void Shutdown() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    Wake();
    if (thread_.joinable()) thread_.join();
    events_.Release();
  }

  void Wake() {
    uint64_t one = 1;
    if (write(wake_, &one, 8) < 0) {
      // EAGAIN: the counter is already nonzero, the thread will wake anyway
    }
  }

  void Emit(Event* e) { events_.Emit(e); }

  // Maps pages [first, first+n) into the guest and wakes whoever waits on them. A disk's pages are
  // in its image once they landed: nothing to map (an access waiting on them goes on by disks_).
  bool Continue(uint32_t first, uint32_t n, SysError& err) {
    if (first >= guestPages_) return true;
    n = std::min(n, guestPages_ - first);
    while (n > 0) {  // a run split where one region's mapping ends
      const GuestRange& r = RangeOf(first);
      uint32_t here = std::min(n, r.first + r.pages - first);
      if (!ContinueIn(r.address + uint64_t{first - r.first} * kPage, here, err)) return false;
      first += here, n -= here;
    }
    return true;
  }

  bool ContinueIn(uint64_t start, uint32_t n, SysError& err) {
    uint64_t end = start + uint64_t{n} * kPage;
    while (start < end) {
      uffdio_continue c{};
      c.range.start = start;
      c.range.len = end - start;
      if (ioctl(uffd_, UFFDIO_CONTINUE, &c) == 0) return true;
      int e = errno;
      uint64_t done = c.mapped > 0 ? static_cast<uint64_t>(c.mapped) : 0;
      if (e == EEXIST) {
        // the guest's page table already has the page (mapped earlier): nothing to install,
        // but a thread may wait on it: wake it, and go on after it
        start += done;
        uffdio_range w{start, kPage};
        ioctl(uffd_, UFFDIO_WAKE, &w);
        start += kPage;
      } else if (e == EAGAIN) {
        start += done;  // the guest's mappings are changing (mremap, fork): retry the rest
      } else {          // ESRCH: the guest process is gone; ENOENT/EINVAL: not our mapping any more
        return err.set("ioctl(UFFDIO_CONTINUE)", e), false;
      }
    }
    return true;
  }

  const GuestRange& RangeOf(uint32_t page) const {
    for (const GuestRange& r : ranges_) {
      if (page < r.first + r.pages) return r;
    }
    return ranges_.back();  // callers pass pages < pages_, which the ranges cover
  }

  // The page a guest address is in, or false when it is in none of the regions.
  bool PageAt(uint64_t a, uint32_t* p) const {
    for (const GuestRange& r : ranges_) {
      if (a >= r.address && a < r.address + uint64_t{r.pages} * kPage) return *p = r.first + static_cast<uint32_t>((a - r.address) / kPage), true;
    }
    return false;
  }

  // A whole page body is in the region (or scratch): record it and map it if someone waits.
  // A block the guest claimed (overwrites whole) lands in scratch: its hash is the source's
  // copy's, for the digest, and the guest's write stays.
  void Landed(uint32_t p, bool toRegion, const uint8_t* scratch, bool viaRequest, std::vector<uint32_t>& toMap) {
    const bool claimed = !toRegion && state_[p] == kClaimed;
    if (!toRegion && !claimed) {
      duplicates_++;
      return;
    }
    hashes_[p] = PageHash(claimed ? scratch : m_->addr + uint64_t{p} * kPage, kPage);
    (viaRequest ? pulled_ : pushed_)++;
    arrived_++;
    arrivedShared_.store(arrived_, std::memory_order_relaxed);
    auto at = state_[p] == kRequested ? faultAt_.find(p) : faultAt_.end();
    if (at != faultAt_.end()) {  // a fault waited on it (a disk access's wait is disks_'s)
      uint64_t lat = NowNs() - at->second;
      faultAt_.erase(at);
      blockedNs_ += lat;
      std::lock_guard<std::mutex> g(mu_);
      latencies_.push_back(lat);
    }
    state_[p] = kArrived;
    toMap.push_back(p);  // mapped right away: a pushed page the guest touches later costs no fault
  }

  bool MapRuns(std::vector<uint32_t>& toMap, SysError& err) {
    for (size_t k = 0; k < toMap.size();) {
      size_t run = 1;
      while (k + run < toMap.size() && toMap[k + run] == toMap[k] + run) run++;
      if (!Continue(toMap[k], static_cast<uint32_t>(run), err)) return false;
      for (size_t j = 0; j < run; j++) state_[toMap[k + j]] = kMapped;
      k += run;
    }
    toMap.clear();
    return true;
  }

  // Reads what `link` has (at most `budget` bytes of bodies). 0 would block, 1 progress, -1 error.
  int ReadPages(Link& link, PageReader& r, bool viaRequest, size_t budget, std::vector<uint32_t>& toMap, SysError& err) {
    for (;;) {
      if (r.phase < 3) {
        size_t want = r.phase == 0 ? kHeader : r.phase == 1 ? kHeader + 8 : kHeader + 8 + size_t{r.count} * 4;
        uint8_t* dst = r.phase < 2 ? r.head + r.got : reinterpret_cast<uint8_t*>(r.idx.data()) + (r.got - kHeader - 8);
        iovec part{dst, want - r.got};
        ssize_t n = link.RecvSome(&part, 1, err);
        if (n <= 0) return static_cast<int>(n);
        r.got += static_cast<size_t>(n);
        if (r.got < want) continue;
        if (r.phase == 0) {
          uint8_t type;
          uint32_t length;
          if (!CheckHeader(r.head, version_, &type, &length, err)) return -1;
          if (type != kPages) return err.fail("ERR_LIVEMIG_PROTOCOL", "unexpected frame type " + std::to_string(type) + " on a post-copy page stream"), -1;
          r.phase = 1;
        } else if (r.phase == 1) {
          uint32_t round;
          const uint32_t length = Le32(r.head + 8);
          if (!wire::CheckPagesPrefix("post-copy PAGES", r.head + kHeader, kMaxBatch, &round, &r.count, err) ||
              !wire::CheckPlainPagesLength("post-copy PAGES", length, r.count, err))
            return -1;
          r.idx.resize(r.count);
          r.phase = 2;
        } else {
          r.toRegion.resize(r.count);
          if (!wire::DecodePageIndices(r.idx.data(), r.count, pages_, err)) return -1;
          for (uint32_t k = 1; k < r.count; k++)
            if (r.idx[k] <= r.idx[k - 1]) return err.fail("ERR_LIVEMIG_PROTOCOL", "post-copy page indices are not ascending"), -1;
          for (uint32_t k = 0; k < r.count; k++) {
            uint8_t s = state_[r.idx[k]];
            // a page already here (sent twice around a reconnect) must not be written again
            r.toRegion[k] = (s == kMissing || s == kRequested) ? 1 : 0;
          }
          r.phase = 3;
          r.at = 0;
          r.off = 0;
        }
        continue;
      }
      // bodies: one recvmsg over the next pages, straight to where they belong
      iovec iov[kScratchPages];
      int n = 0;
      size_t bytes = 0;
      for (uint32_t k = r.at; k < r.count && n < static_cast<int>(kScratchPages) && bytes < budget; k++, n++) {
        size_t skip = k == r.at ? r.off : 0;
        // the same page may come on both connections (a request answered while its pushed copy
        // was still in flight): once one copy landed the page is the guest's, and the rest of
        // the other, even half received, goes to scratch
        if (r.toRegion[k] && state_[r.idx[k]] >= kArrived) r.toRegion[k] = 0;
        // a scratch page per place in the frame: a claimed block's copy is hashed once whole
        uint8_t* base = r.toRegion[k] ? m_->addr + uint64_t{r.idx[k]} * kPage : ScratchFor(k);
        iov[n] = {base + skip, kPage - skip};
        bytes += kPage - skip;
      }
      ssize_t got = link.RecvSome(iov, n, err);
      if (got <= 0) return static_cast<int>(got);
      bytes_ += static_cast<uint64_t>(got);
      size_t left = static_cast<size_t>(got);
      while (left > 0) {
        size_t need = kPage - r.off;
        size_t take = left < need ? left : need;
        r.off += take;
        left -= take;
        if (r.off == kPage) {
          Landed(r.idx[r.at], r.toRegion[r.at], ScratchFor(r.at), viaRequest, toMap);
          r.at++;
          r.off = 0;
        }
      }
      if (r.at == r.count) r.Reset();
      if (!MapRuns(toMap, err)) return -1;
      if (static_cast<size_t>(got) >= budget || budget == 0) return 1;
      budget -= static_cast<size_t>(got);
    }
  }

  // Reads every fault the guest raised: a page already here is mapped, a missing one is asked
  // for once (a second thread faulting on it waits with the first). False with err set.
  bool ReadFaults(std::vector<uint32_t>& toMap, std::vector<uint32_t>& toRequest, SysError& err) {
    uffd_msg msgs[64];
    for (;;) {
      ssize_t n = read(uffd_, msgs, sizeof msgs);
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return true;  // drained
        return err.set("read(userfaultfd)", errno), false;
      }
      for (size_t k = 0; k < static_cast<size_t>(n) / sizeof(uffd_msg); k++) {
        if (msgs[k].event != UFFD_EVENT_PAGEFAULT) continue;  // no other event was asked for
        uint64_t a = msgs[k].arg.pagefault.address;
        uint32_t p;
        if (!PageAt(a, &p)) return err.fail("ERR_LIVEMIG_STATE", "a fault outside the registered regions"), false;
        faults_++;
        switch (state_[p]) {
          case kArrived:  // here but not yet mapped: map it now
            faultsLocal_++;
            toMap.push_back(p);
            break;
          case kMissing:
            state_[p] = kRequested;
            faultAt_[p] = NowNs();  // only pages a fault waits on: a few thousand, not one per page
            toRequest.push_back(p);
            break;
          case kRequested:  // another thread waits on the same page: one request is enough
            break;
          case kMapped: {  // mapped after this fault was raised; CONTINUE woke it, wake again to be sure
            const GuestRange& r = RangeOf(p);
            uffdio_range w{r.address + uint64_t{p - r.first} * kPage, kPage};
            ioctl(uffd_, UFFDIO_WAKE, &w);
            break;
          }
        }
      }
    }
  }

  // The wake-up event: stop (false), or connections attached after a break, which replace the
  // old ones (`replaced`); requests in flight on the old connection are asked again.
  bool TakeWake(std::shared_ptr<Link>& push, std::shared_ptr<Link>& prio, PageReader& pushR, PageReader& prioR, std::vector<uint32_t>& toRequest,
                bool& replaced) {
    uint64_t v;
    if (read(wake_, &v, 8) < 0) { /* EAGAIN: another wake already consumed it */
    }
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) return false;
    if (newPush_) {
      push = std::move(newPush_), prio = std::move(newPrio_);
      newPush_.reset(), newPrio_.reset();
      currentGen_ = newGen_;
      replaced = true;
      connected_ = true;
      pushR.Reset(), prioR.Reset();
      for (uint32_t p = 0; p < pages_; p++)
        if (state_[p] == kRequested) toRequest.push_back(p);
    }
    return true;
  }

  // COMPLETE for the source: the digest over every page's hash, and the page count.
  bool QueueComplete(Link& prio, std::vector<uint8_t>& out, SysError& err) {
    uint8_t f[kHeader + 12];
    PutHeader(f, version_, kComplete, 12);
    uint64_t d = DigestOf();
    std::memcpy(f + kHeader, &d, 8);
    Put32(f + kHeader + 8, static_cast<uint32_t>(pages_));
    digest_ = d;
    return Queue(prio, f, sizeof f, out, err);
  }

  // Appends a frame for the priority connection to out: as it is, or sealed in a record.
  static bool Queue(Link& prio, const uint8_t* frame, size_t len, std::vector<uint8_t>& out, SysError& err) {
    if (prio.encrypted()) return prio.tx()->SealInto(frame, len, out, err);
    out.insert(out.end(), frame, frame + len);
    return true;
  }

  void Run() {
    // a fault waits on this thread: let it preempt bulk work (the guest's own threads included)
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), -10);
    std::shared_ptr<Link> push, prio;
    PageReader pushR, prioR;
    std::vector<uint32_t> toRequest, toMap;
    std::vector<uint8_t> out;  // bytes waiting to go to the source on the priority connection
    size_t outAt = 0;
    bool completeQueued = false, completeSent = false;
    SysError err;
    // pages held from pre-copy are mapped into the guest a run at a time, between events
    uint32_t mapCursor = 0;
    auto mapHeld = [&]() -> bool {
      for (uint32_t budget = 2048; mapCursor < pages_ && budget > 0; mapCursor++, budget--)
        if (state_[mapCursor] == kArrived) toMap.push_back(mapCursor);
      return MapRuns(toMap, err);
    };
    auto disconnect = [&](const SysError& why) {
      push.reset(), prio.reset();
      connected_ = false;
      out.clear(), outAt = 0;
      pushR.Reset(), prioR.Reset();
      if (completeSent) return;  // the source closes once it has everything it needed to hear
      completeQueued = false;
      Event* e = new Event{"disconnected", why.detail.empty() ? why.syscall + ": " + std::strerror(why.err) : why.detail, why.code};
      e->generation = currentGen_;
      Emit(e);
    };
    std::vector<uint8_t> frame;
    // queues the waiting requests and sends what the priority connection takes now; false if it broke
    auto flushOut = [&]() -> bool {
      if (prio && !toRequest.empty()) {
        for (size_t at = 0; at < toRequest.size(); at += kMaxBatch) {
          uint32_t n = static_cast<uint32_t>(std::min<size_t>(kMaxBatch, toRequest.size() - at));
          frame.resize(kHeader + 4 + 4 * size_t{n});
          PutHeader(frame.data(), version_, kRequest, 4 + 4 * n);
          Put32(&frame[kHeader], n);
          for (uint32_t k = 0; k < n; k++) Put32(&frame[kHeader + 4 + 4 * k], toRequest[at + k]);
          SysError e;
          if (!Queue(*prio, frame.data(), frame.size(), out, e)) {
            err = e;
            return false;
          }
        }
        toRequest.clear();
      }
      if (prio && outAt < out.size()) {
        ssize_t n = send(prio->fd(), out.data() + outAt, out.size() - outAt, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
          SysError e;
          e.set("send", errno);
          disconnect(e);
          return false;
        }
        if (n > 0) outAt += static_cast<size_t>(n);
        if (outAt == out.size()) {
          out.clear(), outAt = 0;
          if (completeQueued && !completeSent) {
            completeSent = true;
            Event* e = new Event{"complete", "", ""};
            e->digest = digest_;
            Emit(e);
          }
        }
      }
      return true;
    };
    for (;;) {
      pollfd fds[6];
      int nf = 0;
      fds[nf++] = {wake_, POLLIN, 0};
      fds[nf++] = {uffd_, POLLIN, 0};
      // the disks' accesses, and the VMM's asks: -1 never polls ready
      fds[nf++] = {disks_.fd(), POLLIN, 0};
      fds[nf++] = {disks_.asksFd(), POLLIN, 0};
      std::shared_ptr<Link> polled[6];  // the connection behind each entry from the fifth on
      if (prio) polled[nf] = prio, fds[nf++] = {prio->fd(), static_cast<short>(POLLIN | (outAt < out.size() ? POLLOUT : 0)), 0};
      if (push) polled[nf] = push, fds[nf++] = {push->fd(), POLLIN, 0};
      // plaintext already opened into a link's buffer is not announced by poll: do not wait then
      const bool buffered = (prio && prio->HasBuffered()) || (push && push->HasBuffered());
      if (poll(fds, nf, mapCursor < pages_ || buffered ? 0 : -1) < 0) {
        if (errno == EINTR) continue;
        err.set("poll", errno);
        break;
      }
      if (mapCursor < pages_ && !mapHeld()) break;
      bool replaced = false;
      if (fds[0].revents && !TakeWake(push, prio, pushR, prioR, toRequest, replaced)) break;
      if (replaced) {
        // what was queued for the old connection (sealed under its keys) is asked again below
        out.clear(), outAt = 0;
        if (!completeSent) completeQueued = false;
      }
      if (fds[1].revents && (!ReadFaults(toMap, toRequest, err) || !MapRuns(toMap, err))) break;
      if (fds[2].revents && (!disks_.Read(state_, toRequest, err) || !disks_.AnswerReady(state_, err))) break;
      if (fds[3].revents && (!disks_.ReadAsks(state_, toRequest, err) || !disks_.AnswerReady(state_, err))) break;
      // a fault's request goes out before any bulk reading
      if (!flushOut()) {
        if (err.failed()) break;
        continue;
      }
      for (int k = 4; k < nf; k++) {
        Link* link = polled[k].get();
        if (link != prio.get() && link != push.get()) continue;  // replaced above
        if (!fds[k].revents && !link->HasBuffered()) continue;
        bool isPrio = link == prio.get();
        SysError e;
        // requests first: drain the priority connection; the push stream a chunk at a time
        // while a fault waits, look at the priority connection again after every few pages
        size_t budget = isPrio ? SIZE_MAX : faultAt_.empty() && !disks_.waiting() ? kPushChunk : kPushChunkWaiting;
        int r = ReadPages(*link, isPrio ? prioR : pushR, isPrio, budget, toMap, e);
        if (r < 0) {
          if (e.syscall == "ioctl(UFFDIO_CONTINUE)") {
            err = e;
            break;
          }
          if (e.code == "ERR_LIVEMIG_PROTOCOL" || e.code == "ERR_LIVEMIG_PAGE_INDEX" || e.code == "ERR_LIVEMIG_VERSION") {
            err = e;  // a broken peer is not a broken link: stop
            break;
          }
          disconnect(e);
          break;
        }
        // an access waiting on a disk goes on as soon as its blocks are in, not after the push's chunk
        if (disks_.waiting() && !disks_.AnswerReady(state_, err)) break;
      }
      if (err.failed()) break;
      if (disks_.waiting() && !disks_.AnswerReady(state_, err)) break;
      // requests, and COMPLETE once everything is here, go after this round's reads
      if (prio && arrived_ == pages_ && !completeQueued) {
        if (!QueueComplete(*prio, out, err)) break;
        completeQueued = true;
      }
      if (!flushOut()) {
        if (err.failed()) break;
        continue;
      }
      if (completeSent && mapCursor == pages_) break;  // every page is in the guest: nothing left to serve
    }
    if (!err.failed() && completeSent) {
      // no fault can need us any more; a page the guest drops later faults in from the memfd
      for (const GuestRange& r : ranges_) {
        uffdio_range all{r.address, uint64_t{r.pages} * kPage};
        if (ioctl(uffd_, UFFDIO_UNREGISTER, &all) != 0 && errno != ESRCH) err.set("ioctl(UFFDIO_UNREGISTER)", errno);
      }
    }
    disks_.AnswerRest(state_);  // every block here: they go on; else they fail (EIO), never read stale
    push.reset(), prio.reset();
    connected_ = false;
    if (err.failed()) Emit(new Event{"error", err.detail.empty() ? err.syscall + ": " + std::strerror(err.err) : err.detail, err.code});
    else Emit(new Event{"stopped", "", ""});
  }

  uint64_t DigestOf();

  Mapping* m_ = nullptr;
  uint64_t pages_ = 0;
  int uffd_ = -1;
  int wake_ = -1;
  std::vector<GuestRange> ranges_;
  uint32_t guestPages_ = 0;  // the memory's pages, which the guest ranges cover; the disks' follow
  DiskWaits disks_;
  uint8_t version_ = 0;
  uint8_t* state_ = nullptr;
  Napi::Reference<Napi::Uint8Array> stateRef_;
  std::unordered_map<uint32_t, uint64_t> faultAt_;
  uint64_t* hashes_ = nullptr;
  Napi::Reference<Napi::BigUint64Array> hashesRef_;
  uint64_t arrived_ = 0, digest_ = 0;
  static constexpr size_t kScratchPages = 64;  // the most bodies one recvmsg takes (ReadPages)
  uint8_t* ScratchFor(uint32_t k) { return scratch_.data() + (k % kScratchPages) * kPage; }
  std::vector<uint8_t> scratch_ = std::vector<uint8_t>(kScratchPages * kPage);
  std::thread thread_;
  std::mutex mu_;
  bool stop_ = false;
  std::shared_ptr<Link> newPush_, newPrio_;
  uint32_t attachments_ = 0, newGen_ = 0;  // under mu_
  uint32_t currentGen_ = 0;                // the thread's own
  std::vector<uint64_t> latencies_;
  std::atomic<uint64_t> faults_{0}, faultsLocal_{0}, pulled_{0}, pushed_{0}, duplicates_{0}, blockedNs_{0}, bytes_{0}, arrivedShared_{0};
  std::atomic<bool> connected_{false};
  EventSink events_;
};

}  // namespace

uint64_t PostcopyDest::DigestOf() { return DigestHashes(hashes_, pages_); }

Napi::Function DestClass(Napi::Env env) { return PostcopyDest::Init(env); }

}  // namespace postcopy
}  // namespace livemig
