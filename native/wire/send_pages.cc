// Sending pages (see send_pages.h). A batch goes through four steps: copy its pages from the
// region's files (region/file_io.h), classify them (encoded frames only), frame them (header,
// indices, encodings, iovecs over the copy), send; then the pages are hashed after the send,
// while still in cache, and raw pages that may serve as dup sources enter the dedup index.
#include "wire/send_pages.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <ctime>

#include "codec/pagehash.h"
#include "region/file_io.h"
#include "wire/format.h"

namespace livemig {
namespace wire {

namespace {

long long NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

// What one batch needs, kept across batches so that nothing is allocated per frame.
struct Batch {
  const uint32_t* b = nullptr;
  size_t n = 0;
  // the batch's pages, copied from the region's files (region/file_io.h): every check, hash
  // and send below reads this copy, never the guest's memory
  std::vector<uint8_t> pages;
  uint8_t* Page(size_t k) { return pages.data() + k * kPageSize; }
  long long copyNs = 0;  // of this batch's copy: plain frames pay it too, so it is no encoding overhead
  uint8_t type = kPages;
  uint64_t payload = 0;
  size_t kept = 0;  // pages in the frame (skipped ones are left out)
  std::vector<uint8_t> head;
  std::vector<iovec> iov;
  std::vector<uint8_t> enc, dupBodies, hashedEarly, wantIndex;
  // pages the read found all-zero where they lie (region/read_path.h): not copied
  std::vector<uint8_t> zeroInPlace;
  std::vector<uint64_t> refs;
};

// A PAGES frame of the whole batch: indices in the head, bodies straight from the region.
void PlainFrame(const SendPagesJob& job, Batch& t, SendCounts& c) {
  t.type = kPages;
  t.kept = t.n;
  t.payload = kPagesPrefixBytes + t.n * (4 + kPageSize);
  t.head.resize(kHeaderBytes + kPagesPrefixBytes + t.n * 4);
  for (size_t k = 0; k < t.n; k++) Put32(t.head.data() + kHeaderBytes + kPagesPrefixBytes + 4 * k, t.b[k]);
  t.iov.push_back({t.head.data(), t.head.size()});
  t.iov.push_back({t.pages.data(), t.n * kPageSize});
  c.raw += static_cast<double>(t.n);
}

// Chooses each page's encoding in place. Hashes before sending only where it can pay: the page
// may still be what the receiver holds there, or its fingerprint matches indexed content;
// otherwise it is hashed after the send, while still in cache. Returns how many pages went raw.
// Pages copied (region/file_io.h) a slice at a time, each just before it is classified: the
// check then reads what the copy left in the core's cache, not a batch that spilled out of it.
constexpr size_t kSlicePages = 32;

size_t Classify(const SendPagesJob& job, Batch& t, SysError& err) {
  DedupState* dedup = job.dedup;
  const bool zeroOn = job.flags & kSendZero, dedupOn = job.flags & kSendDedup;
  const uint64_t zh = ZeroPageHash(kPageSize);
  const size_t n = t.n;
  t.enc.resize(n);
  t.refs.resize(n);
  t.dupBodies.resize(n * kDupBody);
  t.hashedEarly.resize(n);
  t.wantIndex.resize(n);
  t.zeroInPlace.resize(n);
  dedup->order.Begin(t.b, n, job.pageCount);
  t.kept = 0;
  size_t raws = 0;
  for (size_t k = 0; k < n; k++) {
    if (k % kSlicePages == 0) {
      long long c0 = NowNs();
      if (!ReadPages(*job.m, t.b + k, std::min(kSlicePages, n - k), t.Page(k), err, zeroOn ? &t.zeroInPlace[k] : nullptr)) return 0;
      t.copyNs += NowNs() - c0;
    }
    uint32_t x = t.b[k];
    const uint8_t* live = t.Page(k);
    bool zero = zeroOn && (t.zeroInPlace[k] || IsZeroPage(live, kPageSize));
    bool early = zero || (dedupOn && ((dedup->known[x] && dedup->holder[x] != zh) || dedup->MayHold(live)));
    uint64_t h = zero ? zh : early ? PageHash(live, kPageSize) : 0;
    t.hashedEarly[k] = early;
    if (early) {
      job.hashes[x] = h;
      uint32_t source = 0;
      t.enc[k] = dedup->Choose(x, k, h, zero, zeroOn, dedupOn, false, &source);
      if (t.enc[k] == kDup) {
        std::memcpy(&t.dupBodies[k * kDupBody], &h, 8);
        Put32(&t.dupBodies[k * kDupBody + 8], source);
      }
    } else {
      t.enc[k] = kRaw;
      dedup->Invalidate(x);
    }
    // index a raw page after the send if it may be a dup source: early-hashed pages, and
    // others whose content was seen before (not every unique page)
    t.wantIndex[k] = dedupOn && t.enc[k] == kRaw && (early || dedup->SeenBefore(live));
    t.refs[k] = h;
    if (t.enc[k] != kSkip) t.kept++;
    raws += t.enc[k] == kRaw;
  }
  return raws;
}

// A PAGES_ENC frame of the classified batch: skipped pages left out, consecutive raw pages in
// one iovec, dup bodies from the side buffer, zero pages without a body.
void EncodedFrame(const SendPagesJob& job, Batch& t, SendCounts& c) {
  t.type = kPagesEnc;
  const size_t kept = t.kept;
  t.head.resize(kHeaderBytes + kPagesPrefixBytes + kept * 5);
  t.iov.push_back({t.head.data(), t.head.size()});
  t.payload = kPagesPrefixBytes + kept * 5;
  uint8_t* indices = t.head.data() + kHeaderBytes + kPagesPrefixBytes;
  size_t j = 0;
  bool lastWasPage = false;
  const uint64_t zh = ZeroPageHash(kPageSize);
  for (size_t k = 0; k < t.n; k++) {
    uint8_t e = t.enc[k];
    if (e == kSkip) {
      // a zero page the receiver holds as zero (a fresh region's) counts with the zero pages
      if (t.hashedEarly[k] && t.refs[k] == zh) c.zero++;
      else c.skipped++;
      continue;
    }
    Put32(indices + 4 * j, t.b[k]);
    indices[4 * kept + j] = e;
    j++;
    if (e == kRaw) {
      uint8_t* p = t.Page(k);
      if (lastWasPage && static_cast<uint8_t*>(t.iov.back().iov_base) + t.iov.back().iov_len == p) t.iov.back().iov_len += kPageSize;
      else t.iov.push_back({p, kPageSize});
      lastWasPage = true;
      t.payload += kPageSize;
      c.raw++;
      continue;
    }
    lastWasPage = false;
    if (e == kDup) {
      t.iov.push_back({&t.dupBodies[k * kDupBody], kDupBody});
      t.payload += kDupBody;
      c.dup++;
    } else {
      c.zero++;
    }
  }
}

// A raw page went out as exactly the bytes it was hashed from (the batch's copy): the receiver
// now holds it under that hash, so it may serve as a dup source from now on, whatever the guest
// wrote to it since (the tracker reports that write, and the resend updates the index).
void IndexSent(const SendPagesJob& job, Batch& t, SendCounts& c, long long& overhead) {
  if (!(job.flags & kSendDedup)) return;
  long long tIndex = NowNs();
  for (size_t k = 0; k < t.n; k++) {
    if (k + 8 < t.n && t.wantIndex[k + 8]) job.dedup->head.Prefetch(t.refs[k + 8]);
    if (!t.wantIndex[k]) continue;
    job.dedup->Set(t.b[k], t.refs[k]);
    job.dedup->NoteFingerprint(t.b[k], t.Page(k));
  }
  overhead += NowNs() - tIndex;
  c.indexMs += static_cast<double>(NowNs() - tIndex) / 1e6;
}

// After the send: every page of a plain call is hashed live (and is not known to match what
// the index says); an encoded call hashes the raw pages it did not hash before, then indexes.
void AfterSend(const SendPagesJob& job, Batch& t, SendCounts& c, long long& overhead) {
  if (!job.flags) {
    for (size_t k = 0; k < t.n; k++) {
      job.hashes[t.b[k]] = PageHash(t.Page(k), kPageSize);
      if (job.dedup) job.dedup->Invalidate(t.b[k]);
    }
    return;
  }
  for (size_t k = 0; k < t.n; k++)
    if (t.enc[k] == kRaw && !t.hashedEarly[k]) t.refs[k] = job.hashes[t.b[k]] = PageHash(t.Page(k), kPageSize);
  IndexSent(job, t, c, overhead);
}

}  // namespace

struct SendScratch {
  std::atomic<bool> taken{false};
  Batch batch;
};

std::shared_ptr<SendScratch> NewSendScratch() { return std::make_shared<SendScratch>(); }

namespace {

// The connection's buffers for one call, or buffers of the call's own when another call holds them.
class ScratchLease {
 public:
  explicit ScratchLease(SendScratch* s) : s_(s && !s->taken.exchange(true, std::memory_order_acquire) ? s : nullptr) {}
  ~ScratchLease() {
    if (s_) s_->taken.store(false, std::memory_order_release);
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  Batch& batch() { return s_ ? s_->batch : own_; }

 private:
  SendScratch* s_;
  Batch own_;
};

}  // namespace

void SendPages(const SendPagesJob& job, SendCounts& c, SysError& err) {
  ScratchLease lease(job.scratch.get());
  Batch& t = lease.batch();
  // time spent on encoding work (classifying before the send, indexing after it), so the
  // chooser can weigh it against the bytes it saved
  long long overhead = 0;
  for (size_t start = 0; start < job.count && !err.failed(); start += job.batchPages) {
    t.n = std::min<size_t>(job.batchPages, job.count - start);
    t.b = job.idx + start;
    t.iov.clear();
    // grown, never shrunk: the buffers live as long as the connection, and a resize back up
    // would zero what the next copy overwrites anyway
    if (t.pages.size() < t.n * kPageSize) t.pages.resize(t.n * kPageSize);
    t.copyNs = 0;
    long long t0 = NowNs();
    if (!job.flags) {
      if (!ReadPages(*job.m, t.b, t.n, t.pages.data(), err)) break;
      PlainFrame(job, t, c);
    } else if (size_t raws = Classify(job, t, err); err.failed()) {
      break;
    } else if (raws == t.n) {
      // nothing saved in this batch: a plain PAGES frame says the same and its receiver has
      // less to do (no encodings to parse, one header per frame)
      PlainFrame(job, t, c);
    } else {
      EncodedFrame(job, t, c);
    }
    if (t.kept == 0) continue;
    if (job.flags) overhead += NowNs() - t0 - t.copyNs;
    PutPagesHead(t.head.data(), job.version, t.type, t.payload, job.round, static_cast<uint32_t>(t.kept));
    if (!job.link->Send(t.iov.data(), static_cast<int>(t.iov.size()), t.head.size(), err)) break;
    c.bytes += static_cast<double>(kHeaderBytes + t.payload);
    AfterSend(job, t, c, overhead);
  }
  c.overheadMs = static_cast<double>(overhead) / 1e6;
}

void SendEncodedBatch(Link& link, const EncodedBatch& b, double& bytes, SysError& err) {
  std::vector<uint32_t> keep;
  for (size_t k = 0; k < b.count; k++)
    if (b.enc[k] != kSkip) keep.push_back(static_cast<uint32_t>(k));
  if (keep.empty()) return;
  size_t c = keep.size();
  std::vector<uint8_t> head(kHeaderBytes + kPagesPrefixBytes + c * 5);
  std::vector<uint8_t> small(c * 16);  // dup bodies and lz4 lengths
  std::vector<iovec> iov;
  iov.push_back({head.data(), head.size()});
  uint64_t payload = kPagesPrefixBytes + c * 5;
  uint8_t* indices = head.data() + kHeaderBytes + kPagesPrefixBytes;
  for (size_t j = 0; j < c; j++) {
    size_t k = keep[j];
    Put32(indices + 4 * j, b.idx[k]);
    indices[4 * c + j] = b.enc[k] == kIncompressible ? static_cast<uint8_t>(kRaw) : b.enc[k];
    uint8_t* sm = small.data() + 16 * j;
    switch (b.enc[k]) {
      case kIncompressible:
      case kRaw:
        iov.push_back({const_cast<uint8_t*>(b.staging + k * kPageSize), kPageSize});
        payload += kPageSize;
        break;
      case kDup:  // lengths[k] holds the source page for a dup
        std::memcpy(sm, &b.hashes[b.idx[k]], 8);
        Put32(sm + 8, static_cast<uint32_t>(b.lengths[k]));
        iov.push_back({sm, kDupBody});
        payload += kDupBody;
        break;
      case kLz4:
        Put32(sm, static_cast<uint32_t>(b.lengths[k]));
        iov.push_back({sm, 4});
        iov.push_back({const_cast<uint8_t*>(b.lz4 + k * kPageSize), static_cast<size_t>(b.lengths[k])});
        payload += 4 + b.lengths[k];
        break;
      default: break;  // kZero: no body
    }
  }
  PutPagesHead(head.data(), b.version, kPagesEnc, payload, b.round, static_cast<uint32_t>(c));
  if (link.Send(iov.data(), static_cast<int>(iov.size()), head.size(), err)) bytes = static_cast<double>(kHeaderBytes + payload);
}

}  // namespace wire
}  // namespace livemig
