// The AEAD under an encrypted migration stream's records (io/records.h): AES-256-GCM through the OpenSSL that Node ships (AES-NI/VAES). Keys are never made
// here: they come from the authenticated TLS session's exporter. One Aead per direction, each
// with its own key; the 96-bit nonce is a 4-byte salt then a 64-bit record counter, so a nonce
// never repeats under a key (the counter refuses to wrap).
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

namespace livemig {

constexpr size_t kAeadKeyBytes = 32;
constexpr size_t kAeadSaltBytes = 4;
constexpr size_t kAeadTagBytes = 16;

class Aead {
 public:
  Aead() = default;
  Aead(const Aead&) = delete;
  Aead& operator=(const Aead&) = delete;
  ~Aead();

  bool Init(const uint8_t* key, const uint8_t* salt, SysError& err);
  // Seals the bytes of iov[0..n) (`total` of them) into out: ciphertext, then the 16-byte tag;
  // `aad` (aadLen bytes, may be 0) is authenticated with them but not sent by this.
  bool Seal(const uint8_t* aad, size_t aadLen, const iovec* iov, int n, size_t total, uint8_t* out, SysError& err);
  // Opens the ciphertext in iov[0..n) in place against `tag` and `aad`. The plaintext is
  // written before the tag is known to be good: a failure means the caller must treat those
  // bytes as garbage (the migration ends; nothing is activated from them).
  bool OpenInPlace(const uint8_t* aad, size_t aadLen, const iovec* iov, int n, const uint8_t* tag, SysError& err);
  uint64_t records() const { return seq_; }
  // The next record is number `seq` (records before it were opened elsewhere: the first frame
  // of an accepted connection is opened before its Wire exists, src/receiver/admit.ts).
  void StartAt(uint64_t seq) { seq_ = seq; }

 private:
  bool Nonce(uint8_t* iv, SysError& err);
  EVP_CIPHER_CTX* ctx_ = nullptr;
  uint8_t salt_[kAeadSaltBytes] = {};
  uint64_t seq_ = 0;
};

}  // namespace livemig
