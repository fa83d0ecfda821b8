// Receiving pages into the region: PAGES and PAGES_ENC payloads read from the socket into a
// buffer and written to the region's file (or, where the file takes no writes, straight into
// its pages), every index and encoding checked before a body byte is read, each page hashed
// as it lands. Used by the migration stream's reader (wire.cc) with a page sink.
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <vector>

#include "codec/encode.h"
#include "common.h"
#include "io/link.h"
#include "region/region.h"
#include "wire/format.h"

namespace livemig {
namespace wire {

struct ReadResult {
  uint8_t version = 0, type = 0;
  uint16_t flags = 0;
  std::vector<uint8_t>* payload = nullptr;
  double pages = 0, batches = 0, bytes = 0;
  int64_t lastRound = -1;
};

// Where PAGES frames land, and the rules they must meet.
struct Sink {
  Mapping* m = nullptr;
  uint64_t* hashes = nullptr;
  uint64_t pageCount = 0;
  uint8_t version = 0;
  uint32_t maxBatchPages = 0;
  FrameOrder* order = nullptr;  // set when encodings were negotiated
  // Parallel channels: this connection carries only the pages of its stripes (format.h
  // kStripePages), and a dup may name only such a page, so that every page this reader
  // touches is touched by no other reader. channels 1: every page.
  uint32_t channels = 1, channel = 0;
  bool Owns(uint32_t page) const { return channels == 1 || (page / kStripePages) % channels == channel; }
};

// A connection's receiving buffers (indices, iovecs, bodies), kept for the connection's life so
// that a round's first frame, inside the pause too, lands in memory already touched (see
// SendScratch in send_pages.h). Reads on a connection are one at a time (src/protocol/connection.ts).
struct ReceiveScratch {
  std::vector<uint32_t> idx;
  std::vector<iovec> iov;
  std::vector<uint8_t> body;
};

// Every index below the page count and, with channels, in this connection's stripes.
bool CheckSinkIndices(const Sink& s, uint32_t* idx, uint32_t count, SysError& err);

// One PAGES payload (after its header) into the region. All indices are checked before a
// data byte is read, so a bad batch leaves the region as it was.
bool ReceivePages(Link& link, const Sink& s, uint8_t version, uint32_t length, ReadResult& r, std::vector<uint32_t>& idx, std::vector<iovec>& iov,
                  std::vector<uint8_t>& staging, SysError& err);
// One PAGES_ENC payload (after its header); see receive_pages.cc.
bool ReceiveEncoded(Link& link, const Sink& s, uint8_t version, uint32_t length, ReadResult& r, std::vector<uint32_t>& idx, std::vector<uint8_t>& body,
                    SysError& err);

}  // namespace wire
}  // namespace livemig
