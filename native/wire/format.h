// The wire format's one home on the native side (spec: docs/PROTOCOL.md; TypeScript twin:
// src/protocol/format.ts; test/format.test.ts compares the two through wireFormat()).
// Every frame: a 12-byte little-endian header, then `length` payload bytes:
//   0 u16 magic 0x4D4C | 2 u8 version | 3 u8 type | 4 u16 flags | 6 u16 reserved (0) | 8 u32 length
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "common.h"
#include "io/bytes.h"

namespace livemig {
namespace wire {

constexpr uint16_t kMagic = 0x4D4C;
constexpr size_t kHeaderBytes = 12;
constexpr uint8_t kProtocolVersion = 3;
constexpr uint8_t kMinProtocolVersion = 1;
constexpr uint32_t kMaxPayload = 64u * 1024 * 1024;
constexpr uint16_t kFlagsNone = 0;
constexpr uint16_t kFlagProve = 1;  // DEVICE_STATE, version 3: the destination answers with DIGEST
// The page size of the wire and of every region; the addon refuses to load where the host's
// differs (addon.cc), so nothing else needs to ask.
constexpr size_t kPageSize = 4096;
constexpr uint32_t kMaxBatchPages = 4096;
constexpr size_t kPagesPrefixBytes = 8;  // u32 round, u32 count
constexpr uint32_t kDupBodyBytes = 12;   // u64 content hash, u32 page holding it
constexpr uint32_t kMaxLz4Group = 4;     // pages one LZ4 block may cover
constexpr uint32_t kStripePages = 256;   // parallel channels: page p goes on channel (p / 256) % N
constexpr uint32_t kMaxChannels = 16;

enum FrameType : uint8_t {
  kHello = 1,
  kAccept = 2,
  kError = 3,
  kPages = 4,
  kRoundEnd = 5,
  kDeviceState = 6,
  kCommit = 7,
  kCommitAck = 8,
  kActivate = 9,
  kActivated = 10,
  kAbort = 11,
  kRoundAck = 12,
  kPagesEnc = 13,
  kImageHashes = 14,
  kPostcopy = 15,
  kPostcopyRunning = 16,
  kAttach = 17,
  kPageRequest = 18,       // D->S on the priority connection: u32 count, count x u32 page
  kPostcopyComplete = 19,  // D->S: u64 digest of the page hashes, u32 page count
  kAttached = 20,
  kDigest = 21,    // version 3, R->S: the destination's own digest, asked for by kFlagProve
  kResolve = 22,   // capability resolve, S->R on a new connection
  kResolved = 23,  // R->S: activated or not-activated (then fenced)
  kMaxFrameType = kResolved,
};

// Per-page encodings of PAGES_ENC on the wire (4 is not used).
enum WireEncoding : uint8_t { kEncRaw = 0, kEncZero = 1, kEncDup = 2, kEncLz4 = 3, kEncLz4Cont = 5 };

// The one header writer.
inline void PutHeader(uint8_t* h, uint8_t version, uint8_t type, uint32_t length, uint16_t flags = kFlagsNone) {
  h[0] = kMagic & 0xff;
  h[1] = kMagic >> 8;
  h[2] = version;
  h[3] = type;
  h[4] = static_cast<uint8_t>(flags & 0xff);
  h[5] = static_cast<uint8_t>(flags >> 8);
  h[6] = h[7] = 0;
  Put32(h + 8, length);
}

// Header and the pages prefix (round, count) of a PAGES or PAGES_ENC frame.
inline void PutPagesHead(uint8_t* h, uint8_t version, uint8_t type, uint64_t payload, uint32_t round, uint32_t count) {
  PutHeader(h, version, type, static_cast<uint32_t>(payload));
  Put32(h + kHeaderBytes, round);
  Put32(h + kHeaderBytes + 4, count);
}

struct Header {
  uint8_t version = 0, type = 0;
  uint16_t flags = 0;
  uint32_t length = 0;
};

// The one header check: magic, known type, reserved bytes, length within `maxPayload`.
// Messages match src/protocol (what the reference parser in test/reference says too).
bool CheckHeader(const uint8_t* h, uint32_t maxPayload, Header& out, SysError& err);

// The prefix of a PAGES or PAGES_ENC payload (u32 round, u32 count): count within 1..maxBatch.
// `what` names the frame in messages.
bool CheckPagesPrefix(const char* what, const uint8_t* prefix, uint32_t maxBatch, uint32_t* round, uint32_t* count, SysError& err);
// A PAGES payload is exactly prefix + count x (index + page).
bool CheckPlainPagesLength(const char* what, uint32_t length, uint32_t count, SysError& err);

// Page indices as read off the wire (little-endian u32), decoded in place and each checked
// against the region's page count, and to be strictly increasing, before any page body is read.
bool DecodePageIndices(uint32_t* idx, uint32_t count, uint64_t pageCount, SysError& err);

}  // namespace wire
}  // namespace livemig
