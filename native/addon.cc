// livemig native addon: Linux mechanisms JavaScript cannot reach. No policy lives here.
#include <napi.h>
#include <unistd.h>

#include <string>

#include "common.h"
#include "region/region.h"
#include "wire/format.h"

namespace livemig {

void InitTracking(Napi::Env env, Napi::Object exports);
void InitPages(Napi::Env env, Napi::Object exports);
void InitReadPath(Napi::Env env, Napi::Object exports);
void InitDisk(Napi::Env env, Napi::Object exports);
void InitPrecontent(Napi::Env env, Napi::Object exports);
void InitWrittenBitmap(Napi::Env env, Napi::Object exports);
void InitFdPass(Napi::Env env, Napi::Object exports);
void InitWire(Napi::Env env, Napi::Object exports);
void InitEncode(Napi::Env env, Napi::Object exports);
void InitPostcopy(Napi::Env env, Napi::Object exports);
void InitSched(Napi::Env env, Napi::Object exports);
void InitGuestControl(Napi::Env env, Napi::Object exports);
void InitAead(Napi::Env env, Napi::Object exports);
void InitKernelTls(Napi::Env env, Napi::Object exports);

namespace {

// The wire format's constants as this build has them, for the test that compares them with
// src/protocol/format.ts.
Napi::Object WireFormat(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("magic", wire::kMagic);
  o.Set("headerBytes", static_cast<double>(wire::kHeaderBytes));
  o.Set("protocolVersion", wire::kProtocolVersion);
  o.Set("minProtocolVersion", wire::kMinProtocolVersion);
  o.Set("maxPayload", wire::kMaxPayload);
  o.Set("flagsNone", wire::kFlagsNone);
  o.Set("flagProve", wire::kFlagProve);
  o.Set("pageSize", static_cast<double>(wire::kPageSize));
  o.Set("maxBatchPages", wire::kMaxBatchPages);
  o.Set("pagesPrefixBytes", static_cast<double>(wire::kPagesPrefixBytes));
  o.Set("dupBodyBytes", wire::kDupBodyBytes);
  o.Set("maxLz4Group", wire::kMaxLz4Group);
  o.Set("stripePages", wire::kStripePages);
  o.Set("maxChannels", wire::kMaxChannels);
  o.Set("maxFrameType", static_cast<uint32_t>(wire::kMaxFrameType));
  Napi::Object types = Napi::Object::New(env);
  const std::pair<const char*, uint8_t> named[] = {{"Hello", wire::kHello},
                                                   {"Accept", wire::kAccept},
                                                   {"Error", wire::kError},
                                                   {"Pages", wire::kPages},
                                                   {"RoundEnd", wire::kRoundEnd},
                                                   {"DeviceState", wire::kDeviceState},
                                                   {"Commit", wire::kCommit},
                                                   {"CommitAck", wire::kCommitAck},
                                                   {"Activate", wire::kActivate},
                                                   {"Activated", wire::kActivated},
                                                   {"Abort", wire::kAbort},
                                                   {"RoundAck", wire::kRoundAck},
                                                   {"PagesEnc", wire::kPagesEnc},
                                                   {"ImageHashes", wire::kImageHashes},
                                                   {"Postcopy", wire::kPostcopy},
                                                   {"PostcopyRunning", wire::kPostcopyRunning},
                                                   {"Attach", wire::kAttach},
                                                   {"PageRequest", wire::kPageRequest},
                                                   {"PostcopyComplete", wire::kPostcopyComplete},
                                                   {"Attached", wire::kAttached},
                                                   {"Digest", wire::kDigest},
                                                   {"Resolve", wire::kResolve},
                                                   {"Resolved", wire::kResolved}};
  for (const auto& [name, value] : named) types.Set(name, static_cast<uint32_t>(value));
  o.Set("frameTypes", types);
  Napi::Object enc = Napi::Object::New(env);
  enc.Set("Raw", static_cast<uint32_t>(wire::kEncRaw));
  enc.Set("Zero", static_cast<uint32_t>(wire::kEncZero));
  enc.Set("Dup", static_cast<uint32_t>(wire::kEncDup));
  enc.Set("Lz4", static_cast<uint32_t>(wire::kEncLz4));
  enc.Set("Lz4Cont", static_cast<uint32_t>(wire::kEncLz4Cont));
  o.Set("pageEncodings", enc);
  return o;
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // One truth for the page size: the wire, every region and every page loop use 4 KiB pages.
  // A host with other pages (arm64 with 16 or 64 KiB, say) is refused here, at load, with the
  // reason, rather than migrating with a geometry half the code does not expect.
  long hostPage = sysconf(_SC_PAGESIZE);
  if (hostPage != static_cast<long>(wire::kPageSize)) {
    throw Napi::Error::New(env, "livemig needs 4096-byte pages; this host's page size is " + std::to_string(hostPage));
  }
  InitRegionStatics(env, exports);
  InitTracking(env, exports);
  InitPages(env, exports);
  InitReadPath(env, exports);
  InitDisk(env, exports);
  InitPrecontent(env, exports);
  InitWrittenBitmap(env, exports);
  InitFdPass(env, exports);
  InitWire(env, exports);
  InitEncode(env, exports);
  InitPostcopy(env, exports);
  InitSched(env, exports);
  InitGuestControl(env, exports);
  InitAead(env, exports);
  InitKernelTls(env, exports);
  exports.Set("wireFormat", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value { return WireFormat(info.Env()); }));
  return exports;
}

}  // namespace livemig

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return livemig::Init(env, exports); }

NODE_API_MODULE(livemig, InitAddon)
