// Sending pages: PAGES frames of a copy of the region's pages, or PAGES_ENC frames with zero and dup
// pages found in place (send_pages.cc), and one PAGES_ENC frame of a batch classified and
// compressed beforehand (SendEncodedBatch). No JavaScript; these run on pool threads or, for
// a few pages inside the pause, on the calling thread.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "codec/encode.h"
#include "io/link.h"
#include "region/region.h"

namespace livemig {
namespace wire {

struct SendCounts {
  double bytes = 0, zero = 0, dup = 0, skipped = 0, raw = 0, overheadMs = 0, indexMs = 0;
};

// SEND_ZERO, SEND_DEDUP (src/protocol/wire.ts)
constexpr uint32_t kSendZero = 1;
constexpr uint32_t kSendDedup = 2;

// A connection's sending buffers (one batch's copy, its head and iovecs), kept for the
// connection's life and taken by one SendPages at a time. On a host that charges the first touch
// of fresh memory (a hypervisor exit per 4 KiB page), a batch buffer allocated per call cost
// ~1.5 ms per 500 KiB, inside the pause. A call that finds it taken uses buffers of its own.
struct SendScratch;
std::shared_ptr<SendScratch> NewSendScratch();

struct SendPagesJob {
  std::shared_ptr<Link> link;
  std::shared_ptr<SendScratch> scratch;  // may be null: buffers of the call's own
  Mapping* m = nullptr;
  const uint32_t* idx = nullptr;
  size_t count = 0;
  uint32_t round = 0;
  uint8_t version = 0;
  uint32_t batchPages = 0;
  uint64_t* hashes = nullptr;  // one per page of the region
  uint64_t pageCount = 0;
  DedupState* dedup = nullptr;  // needed with flags
  uint32_t flags = 0;
};

// Sends job.idx in frames of up to batchPages and stores each page's hash. Each batch is first
// copied out of the region's files (region/file_io.h); everything below reads that copy.
// Without flags: PAGES frames, each page hashed right after it went. With flags: PAGES_ENC
// frames where an all-zero page is `zero`, a page whose content the receiver holds elsewhere
// is `dup`, one the receiver already holds there is left out, and the rest go raw (a batch
// with nothing saved goes as PAGES). A raw page that may serve as a dup source enters the dedup
// index once its frame went: the receiver then holds exactly the copy that was hashed. A page
// the guest changes while it is copied may go out torn, and is indexed as it went; the tracker
// reports it dirty (write protection was re-armed before this read), so a later round resends
// and rehashes it.
void SendPages(const SendPagesJob& job, SendCounts& c, SysError& err);

struct EncodedBatch {
  const uint32_t* idx = nullptr;
  const uint8_t* enc = nullptr;      // per page: PageEncoding, kIncompressible (goes raw) or kSkip
  const uint8_t* staging = nullptr;  // raw bodies at k * page size
  const uint8_t* lz4 = nullptr;      // lz4 bodies at k * page size, lengths[k] bytes
  const int32_t* lengths = nullptr;  // lz4: the block's bytes; dup: the page holding the content
  const uint64_t* hashes = nullptr;
  size_t count = 0;
  uint32_t round = 0;
  uint8_t version = 0;
};

// One PAGES_ENC frame of a classified batch; `bytes` is what went (0 if every page was skipped).
void SendEncodedBatch(Link& link, const EncodedBatch& b, double& bytes, SysError& err);

}  // namespace wire
}  // namespace livemig
