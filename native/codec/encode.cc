#include "codec/encode.h"

#include <cstring>

#include "codec/pagehash.h"
#include "common.h"
#include "region/file_io.h"
#include "region/region.h"

namespace livemig {

namespace {
using wire::kPageSize;
}

uint64_t ZeroPageHash(size_t pageSize) {
  static const std::vector<uint8_t> zeros(65536, 0);
  return PageHash(zeros.data(), pageSize);
}

bool IsZeroPage(const uint8_t* p, size_t len) {
  // exits at the first nonzero word, so random pages cost a few loads
  uint64_t acc = 0;
  for (size_t i = 0; i < len; i += 64) {
    uint64_t w[8];
    std::memcpy(w, p + i, 64);
    acc |= w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7];
    if (acc) return false;
  }
  return true;
}

bool LooksCompressible(const uint8_t* p, size_t len) {
  // Distinct byte values among 256 sampled bytes: random data shows ~160, text ~40, and
  // anything LZ4 can shrink by an eighth repeats its bytes far more than random does.
  uint64_t seen[4] = {0, 0, 0, 0};
  size_t step = len / 256;
  for (size_t i = 0; i < 256; i++) {
    uint8_t b = p[i * step];
    seen[b >> 6] |= uint64_t{1} << (b & 63);
  }
  int distinct = __builtin_popcountll(seen[0]) + __builtin_popcountll(seen[1]) + __builtin_popcountll(seen[2]) + __builtin_popcountll(seen[3]);
  return distinct < 128;
}

bool Lz4DecodeBlock(const uint8_t* src, size_t srcLen, uint8_t* dst, size_t dstLen) {
  const uint8_t* ip = src;
  const uint8_t* const iend = src + srcLen;
  size_t op = 0;
  auto readLength = [&](size_t base, size_t* out) -> bool {
    size_t len = base;
    if (base == 15) {
      for (;;) {
        if (ip >= iend) return false;
        uint8_t b = *ip++;
        len += b;
        if (len > dstLen) return false;  // longer than the page can hold: malformed
        if (b != 255) break;
      }
    }
    *out = len;
    return true;
  };
  while (ip < iend) {
    uint8_t token = *ip++;
    size_t lit;
    if (!readLength(token >> 4, &lit)) return false;
    if (lit > static_cast<size_t>(iend - ip) || lit > dstLen - op) return false;
    std::memcpy(dst + op, ip, lit);
    ip += lit;
    op += lit;
    if (ip == iend) break;  // the last sequence has literals only
    if (iend - ip < 2) return false;
    size_t offset = ip[0] | (ip[1] << 8);
    ip += 2;
    if (offset == 0 || offset > op) return false;  // refers before the start of the page
    size_t match;
    if (!readLength(token & 15, &match)) return false;
    match += 4;
    if (match > dstLen - op) return false;
    // byte by byte: a match may overlap its own output (run-length style)
    for (size_t i = 0; i < match; i++, op++) dst[op] = dst[op - offset];
  }
  return op == dstLen;
}

Napi::Function Dedup::Init(Napi::Env env) {
  return DefineClass(env, "Dedup", {InstanceMethod("initImage", &Dedup::InitImage), InstanceMethod("size", &Dedup::Size)});
}

// new Dedup(pageCount): every page unknown.
Dedup::Dedup(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Dedup>(info) { state.Reset(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value())); }

// initImage(hashes: BigUint64Array, channels?, channel?): what the receiver holds before any
// page moves (a fresh region: every page the zero page; a kept image: its page hashes). Same
// order on both sides. With channels, only the pages of this channel's stripes: it sends no
// other page, and may name no other as a dup (its receiver refuses that).
Napi::Value Dedup::InitImage(const Napi::CallbackInfo& info) {
  Napi::BigUint64Array h = info[0].As<Napi::BigUint64Array>();
  if (h.ElementLength() != state.holder.size()) throw Napi::RangeError::New(info.Env(), "image hashes must have one entry per page");
  uint32_t channels = info.Length() > 1 ? info[1].As<Napi::Number>().Uint32Value() : 1;
  uint32_t channel = info.Length() > 2 ? info[2].As<Napi::Number>().Uint32Value() : 0;
  if (channels < 1 || channels > wire::kMaxChannels || channel >= channels) throw Napi::RangeError::New(info.Env(), "channel outside its channels");
  for (size_t i = 0; i < h.ElementLength(); i++)
    if (channels == 1 || (i / wire::kStripePages) % channels == channel) state.Set(static_cast<uint32_t>(i), h.Data()[i]);
  return info.Env().Undefined();
}

Napi::Value Dedup::Size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(state.head.Count())); }

namespace {

// classifyPages(region, pages, staging: Buffer, hashes, dedup, flags, sources: Int32Array)
//   -> Promise<Uint8Array>; sources[k] = the page a dup's content is taken from
// flags: 1 zero, 2 dedup, 4 mark raw pages that look incompressible. The pages are copied to
// staging[k*pageSize] from the region's files and everything reads the copy (it is what goes
// on the wire, so hash and bytes agree). For each page, in order: a page whose content the
// receiver already holds in that very page is skipped; an all-zero page is `zero`; content
// held elsewhere is `dup`; the rest `raw` (the caller may compress it) or `incompressible`
// (send raw, do not try). The dedup index is updated as the receiver will update it.
Napi::Value Classify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
  if (!m) return env.Undefined();
  Napi::Uint32Array pages = info[1].As<Napi::Uint32Array>();
  Napi::Buffer<uint8_t> staging = info[2].As<Napi::Buffer<uint8_t>>();
  Napi::BigUint64Array hashes = info[3].As<Napi::BigUint64Array>();
  Dedup* dedup = Dedup::Unwrap(info[4]);
  uint32_t flags = info[5].As<Napi::Number>().Uint32Value();
  Napi::Int32Array sourcesArr = info[6].As<Napi::Int32Array>();
  uint64_t pageCount = m->size / kPageSize;
  size_t n = pages.ElementLength();
  if (staging.Length() < n * kPageSize) throw Napi::RangeError::New(env, "staging buffer too small");
  if (sourcesArr.ElementLength() < n) throw Napi::RangeError::New(env, "sources array too small");
  int32_t* sources = sourcesArr.Data();
  if (hashes.ElementLength() < pageCount || dedup->state.holder.size() != pageCount) throw Napi::RangeError::New(env, "tables do not match the region");
  const uint32_t* idx = pages.Data();
  for (size_t k = 0; k < n; k++)
    if (idx[k] >= pageCount) throw Napi::RangeError::New(env, "page index outside the region");
  uint8_t* stage = staging.Data();
  uint64_t* table = hashes.Data();
  DedupState* st = &dedup->state;
  m->Ref();
  return Task<std::vector<uint8_t>>::Start(
      env,
      [m, idx, n, stage, table, st, flags, sources](std::vector<uint8_t>& enc, SysError& err) {
        const bool zeroOn = flags & 1, dedupOn = flags & 2, sample = flags & 4;
        const uint64_t zh = ZeroPageHash(kPageSize);
        // the batch copied out of the region's files (region/file_io.h); a write after the
        // copy makes the page dirty: a later round resends it
        if (!ReadPages(*m, idx, n, stage, err)) {
          m->Unref();
          return;
        }
        enc.resize(n);
        st->order.Begin(idx, n, st->holder.size());
        for (size_t k = 0; k < n; k++) {
          uint32_t x = idx[k];
          const uint8_t* page = stage + k * kPageSize;
          bool zero = IsZeroPage(page, kPageSize);
          uint64_t h = zero ? zh : PageHash(page, kPageSize);
          table[x] = h;
          uint32_t source = 0;
          enc[k] = st->Choose(x, k, h, zero, zeroOn, dedupOn, true, &source);
          if (enc[k] == kDup) sources[k] = static_cast<int32_t>(source);
          if ((enc[k] == kRaw || enc[k] == kDup) && !(zero && zeroOn)) st->NoteFingerprint(x, page);
          if (enc[k] == kRaw && !zero && sample && !LooksCompressible(page, kPageSize)) enc[k] = kIncompressible;
        }
        m->Unref();
      },
      [](Napi::Env e, std::vector<uint8_t>& enc) -> Napi::Value {
        Napi::Uint8Array out = Napi::Uint8Array::New(e, enc.size());
        if (!enc.empty()) std::memcpy(out.Data(), enc.data(), enc.size());
        return out;
      },
      {info[0], info[1], info[2], info[3], info[4], info[6]});
}

// lz4DecodePage(src: Buffer, pageSize) -> Buffer | null (tests and tools; the receiver decodes natively)
Napi::Value Lz4DecodePageJs(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> src = info[0].As<Napi::Buffer<uint8_t>>();
  size_t ps = info[1].As<Napi::Number>().Uint32Value();
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(info.Env(), ps);
  if (!Lz4DecodeBlock(src.Data(), src.Length(), out.Data(), ps)) return info.Env().Null();
  return out;
}

// samplePages(region, pages, staging: Buffer) -> Uint8Array: copies each page to
// staging[k*pageSize] (from the region's files) and says what it looks like: 0 all zero, 1 incompressible, 2 worth
// compressing. Synchronous: the caller samples a few dozen pages to keep the chooser's
// compression figures current while batches go out uncompressed.
Napi::Value SamplePages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Mapping* m = Region::Unwrap(info[0])->LiveMapping(env);
  if (!m) return env.Undefined();
  Napi::Uint32Array pages = info[1].As<Napi::Uint32Array>();
  Napi::Buffer<uint8_t> staging = info[2].As<Napi::Buffer<uint8_t>>();
  size_t n = pages.ElementLength();
  uint64_t pageCount = m->size / kPageSize;
  if (staging.Length() < n * kPageSize) throw Napi::RangeError::New(env, "staging buffer too small");
  for (size_t k = 0; k < n; k++)
    if (pages.Data()[k] >= pageCount) throw Napi::RangeError::New(env, "page index outside the region");
  SysError err;
  if (!ReadPages(*m, pages.Data(), n, staging.Data(), err)) throw MakeSysError(env, err);
  Napi::Uint8Array kind = Napi::Uint8Array::New(env, n);
  for (size_t k = 0; k < n; k++) {
    const uint8_t* page = staging.Data() + k * kPageSize;
    kind[k] = IsZeroPage(page, kPageSize) ? 0 : LooksCompressible(page, kPageSize) ? 2 : 1;
  }
  return kind;
}

Napi::Value ZeroHashJs(const Napi::CallbackInfo& info) { return Napi::BigInt::New(info.Env(), ZeroPageHash(kPageSize)); }

}  // namespace

void InitEncode(Napi::Env env, Napi::Object exports) {
  exports.Set("Dedup", Dedup::Init(env));
  exports.Set("classifyPages", Napi::Function::New(env, Classify));
  exports.Set("samplePages", Napi::Function::New(env, SamplePages));
  exports.Set("lz4DecodePage", Napi::Function::New(env, Lz4DecodePageJs));
  exports.Set("zeroPageHash", Napi::Function::New(env, ZeroHashJs));
}

}  // namespace livemig
