// AEAD records (see aead.h), and their JavaScript binding for tests and benchmarks.
#include "io/aead.h"

#include <openssl/evp.h>

#include <chrono>
#include <cstring>
#include <limits>
#include <vector>

namespace livemig {

Aead::~Aead() {
  if (ctx_) EVP_CIPHER_CTX_free(ctx_);
}

bool Aead::Init(const uint8_t* key, const uint8_t* salt, SysError& err) {
  ctx_ = EVP_CIPHER_CTX_new();
  if (!ctx_) return err.fail("ERR_LIVEMIG_NO_MEMORY", "cannot allocate a cipher context"), false;
  // the key is set once; each record sets only its nonce
  if (EVP_CipherInit_ex(ctx_, EVP_aes_256_gcm(), nullptr, key, nullptr, -1) != 1)
    return err.fail("ERR_LIVEMIG_UNSUPPORTED", "AES-256-GCM is not available"), false;
  std::memcpy(salt_, salt, kAeadSaltBytes);
  return true;
}

bool Aead::Nonce(uint8_t* iv, SysError& err) {
  if (seq_ == std::numeric_limits<uint64_t>::max()) return err.fail("ERR_LIVEMIG_PROTOCOL", "the record counter would wrap: the key must change"), false;
  std::memcpy(iv, salt_, kAeadSaltBytes);
  const uint64_t s = seq_++;
  for (int i = 0; i < 8; i++) iv[kAeadSaltBytes + i] = static_cast<uint8_t>(s >> (56 - 8 * i));  // big-endian counter
  return true;
}

bool Aead::Seal(const uint8_t* aad, size_t aadLen, const iovec* iov, int n, size_t total, uint8_t* out, SysError& err) {
  uint8_t iv[12];
  if (!Nonce(iv, err)) return false;
  int len = 0;
  if (EVP_EncryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) != 1) return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_EncryptInit_ex failed"), false;
  if (aadLen && EVP_EncryptUpdate(ctx_, nullptr, &len, aad, static_cast<int>(aadLen)) != 1)
    return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_EncryptUpdate (aad) failed"), false;
  size_t at = 0;
  for (int k = 0; k < n; k++) {
    if (EVP_EncryptUpdate(ctx_, out + at, &len, static_cast<const uint8_t*>(iov[k].iov_base), static_cast<int>(iov[k].iov_len)) != 1)
      return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_EncryptUpdate failed"), false;
    at += static_cast<size_t>(len);
  }
  if (at != total || EVP_EncryptFinal_ex(ctx_, out + at, &len) != 1) return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_EncryptFinal_ex failed"), false;
  if (EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_GET_TAG, kAeadTagBytes, out + total) != 1)
    return err.fail("ERR_LIVEMIG_SYSCALL", "reading the GCM tag failed"), false;
  return true;
}

bool Aead::OpenInPlace(const uint8_t* aad, size_t aadLen, const iovec* iov, int n, const uint8_t* tag, SysError& err) {
  uint8_t iv[12];
  if (!Nonce(iv, err)) return false;
  int got = 0;
  if (EVP_DecryptInit_ex(ctx_, nullptr, nullptr, nullptr, iv) != 1) return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_DecryptInit_ex failed"), false;
  if (aadLen && EVP_DecryptUpdate(ctx_, nullptr, &got, aad, static_cast<int>(aadLen)) != 1)
    return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_DecryptUpdate (aad) failed"), false;
  for (int k = 0; k < n; k++) {
    uint8_t* p = static_cast<uint8_t*>(iov[k].iov_base);
    // GCM is a stream mode: in place, every byte comes out as it goes in (got == iov_len)
    if (EVP_DecryptUpdate(ctx_, p, &got, p, static_cast<int>(iov[k].iov_len)) != 1) return err.fail("ERR_LIVEMIG_SYSCALL", "EVP_DecryptUpdate failed"), false;
  }
  uint8_t tail[16];
  if (EVP_CIPHER_CTX_ctrl(ctx_, EVP_CTRL_GCM_SET_TAG, kAeadTagBytes, const_cast<uint8_t*>(tag)) != 1 || EVP_DecryptFinal_ex(ctx_, tail, &got) != 1) {
    return err.fail("ERR_LIVEMIG_AUTH", "an encrypted record failed authentication: the stream was altered or the keys differ"), false;
  }
  return true;
}

namespace {

// Runs `each` over the records of info[2] with an Aead keyed from info[0] (32 bytes) and
// info[1] (the 4-byte salt), in turn from counter 0; returns what it makes of each.
template <typename Each>
Napi::Value EachRecord(const Napi::CallbackInfo& info, Each each) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> key = info[0].As<Napi::Buffer<uint8_t>>(), salt = info[1].As<Napi::Buffer<uint8_t>>();
  if (key.Length() != kAeadKeyBytes || salt.Length() != kAeadSaltBytes) throw Napi::RangeError::New(env, "key must be 32 bytes and salt 4");
  Napi::Array in = info[2].As<Napi::Array>();
  Aead a;
  SysError err;
  if (!a.Init(key.Data(), salt.Data(), err)) throw MakeSysError(env, err);
  Napi::Array out = Napi::Array::New(env, in.Length());
  for (uint32_t i = 0; i < in.Length(); i++) {
    out.Set(i, each(env, a, in.Get(i).As<Napi::Buffer<uint8_t>>(), err));
    if (err.failed()) throw MakeSysError(env, err);
  }
  return out;
}

// aeadSeal(key: Buffer(32), salt: Buffer(4), records: Buffer[]) -> Buffer[]: each record
// sealed in turn (counter 0, 1, ...); for tests against Node's own AES-256-GCM.
Napi::Value SealJs(const Napi::CallbackInfo& info) {
  return EachRecord(info, [](Napi::Env env, Aead& a, Napi::Buffer<uint8_t> r, SysError& err) {
    Napi::Buffer<uint8_t> sealed = Napi::Buffer<uint8_t>::New(env, r.Length() + kAeadTagBytes);
    iovec v{r.Data(), r.Length()};
    a.Seal(nullptr, 0, &v, 1, r.Length(), sealed.Data(), err);
    return sealed;
  });
}

// aeadOpen(key, salt, sealed: Buffer[]) -> Buffer[]: each opened in turn; throws
// ERR_LIVEMIG_AUTH at the first that fails.
Napi::Value OpenJs(const Napi::CallbackInfo& info) {
  return EachRecord(info, [](Napi::Env env, Aead& a, Napi::Buffer<uint8_t> r, SysError& err) {
    if (r.Length() < kAeadTagBytes) throw Napi::RangeError::New(env, "a sealed record is at least its tag");
    size_t len = r.Length() - kAeadTagBytes;
    Napi::Buffer<uint8_t> plain = Napi::Buffer<uint8_t>::Copy(env, r.Data(), len);
    iovec v{plain.Data(), len};
    a.OpenInPlace(nullptr, 0, &v, 1, r.Data() + len, err);
    return plain;
  });
}

// aeadThroughput(bytes, recordBytes) -> {sealMs, openMs}: one thread seals `bytes` in records
// and opens them again (for bench/secure's budget: what the cipher costs per GiB here).
Napi::Value ThroughputJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t bytes = static_cast<size_t>(info[0].As<Napi::Number>().Int64Value());
  size_t rec = static_cast<size_t>(info[1].As<Napi::Number>().Int64Value());
  if (rec == 0 || rec > (64u << 20) || bytes < rec) throw Napi::RangeError::New(env, "record size must be 1..64 MiB and at most the total");
  std::vector<uint8_t> plain(rec, 0x5a), sealed(rec + kAeadTagBytes);
  uint8_t key[kAeadKeyBytes] = {1}, salt[kAeadSaltBytes] = {2};
  Aead s, o;
  SysError err;
  if (!s.Init(key, salt, err) || !o.Init(key, salt, err)) throw MakeSysError(env, err);
  double sealMs = 0, openMs = 0;
  for (size_t done = 0; done + rec <= bytes; done += rec) {
    auto t0 = std::chrono::steady_clock::now();
    iovec in{plain.data(), rec};
    if (!s.Seal(nullptr, 0, &in, 1, rec, sealed.data(), err)) throw MakeSysError(env, err);
    auto t1 = std::chrono::steady_clock::now();
    iovec out{sealed.data(), rec};
    if (!o.OpenInPlace(nullptr, 0, &out, 1, sealed.data() + rec, err)) throw MakeSysError(env, err);
    auto t2 = std::chrono::steady_clock::now();
    sealMs += std::chrono::duration<double, std::milli>(t1 - t0).count();
    openMs += std::chrono::duration<double, std::milli>(t2 - t1).count();
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("sealMs", sealMs);
  r.Set("openMs", openMs);
  return r;
}

}  // namespace

void InitAead(Napi::Env env, Napi::Object exports) {
  exports.Set("aeadSeal", Napi::Function::New(env, SealJs));
  exports.Set("aeadOpen", Napi::Function::New(env, OpenJs));
  exports.Set("aeadThroughput", Napi::Function::New(env, ThroughputJs));
}

}  // namespace livemig
