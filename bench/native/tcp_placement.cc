// What a TCP receiver pays to place bytes into a large region instead of a reused buffer.
// One process pair on loopback moves 1 GiB with 1 MiB sends from a populated memfd; the
// receiver either discards into a 1 MiB buffer (the raw ceiling), receives straight into a
// populated 1 GiB memfd region (what livemig's receiver does), or does that and hashes every
// page with PageHash as it lands (livemig's receiver, minus framing). The sender optionally
// hashes every page too (livemig's sender). Mode both-hash-aead adds what an encrypted data path
// would cost (issue 17's design): the sender seals each 256 KiB record with AES-256-GCM
// (OpenSSL's EVP, the same 3.0 line Node ships) from the region into a staging buffer, a
// 96-bit counter nonce per record, and sends ciphertext and tag; the receiver receives a record
// into a staging buffer and opens it straight into the region, refusing it if the tag fails.
// Prints one JSON line per run.
//   bench/native/run-tcp-placement.sh [runs]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include <openssl/evp.h>

#include "codec/pagehash.h"

static const size_t kSize = 1UL << 30, kChunk = 1UL << 20, kRecord = 256UL << 10, kTag = 16;

// One AES-256-GCM record: `n` bytes from `in` to `out`, the tag after them (seal) or checked (open).
static bool Aead(EVP_CIPHER_CTX* c, bool seal, const uint8_t* key, uint64_t seq, const uint8_t* in, size_t n, uint8_t* out, uint8_t* tag) {
  uint8_t iv[12] = {0};
  memcpy(iv + 4, &seq, 8);
  int len = 0;
  if (!EVP_CipherInit_ex(c, EVP_aes_256_gcm(), nullptr, key, iv, seal ? 1 : 0)) return false;
  if (!EVP_CipherUpdate(c, out, &len, in, static_cast<int>(n))) return false;
  if (!seal && !EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, kTag, tag)) return false;
  if (!EVP_CipherFinal_ex(c, out + len, &len)) return false;
  return !seal || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, kTag, tag);
}
static const uint8_t kKey[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};

static double Now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
static double Cpu() {
  rusage r;
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}
static uint8_t* MapMemfd() {
  int fd = memfd_create("bench", 0);
  if (fd < 0 || ftruncate(fd, kSize) != 0) exit(1);
  void* p = mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (p == MAP_FAILED) exit(1);
  return static_cast<uint8_t*>(p);
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "buffer";  // buffer | region | region-hash | both-hash
  bool region = strcmp(mode, "buffer") != 0, rxHash = strstr(mode, "hash") != nullptr, txHash = strncmp(mode, "both-hash", 9) == 0;
  bool aead = strstr(mode, "aead") != nullptr;
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t al = sizeof a;
  if (bind(ls, reinterpret_cast<sockaddr*>(&a), sizeof a) || listen(ls, 1) || getsockname(ls, reinterpret_cast<sockaddr*>(&a), &al)) return 1;
  uint8_t* src = MapMemfd();
  for (size_t i = 0; i < kSize; i += 8) *reinterpret_cast<uint64_t*>(src + i) = i * 0x9E3779B185EBCA87ULL;
  int ready[2], report[2];
  if (pipe(ready) || pipe(report)) return 1;
  if (fork() == 0) {
    uint8_t* dst = region ? MapMemfd() : static_cast<uint8_t*>(malloc(kChunk));
    double c0 = Cpu();
    if (write(ready[1], "r", 1) != 1) _exit(1);
    int c = accept(ls, nullptr, nullptr);
    uint64_t sum = 0;
    EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
    uint8_t* rec = static_cast<uint8_t*>(malloc(kRecord + kTag));
    memset(rec, 0, kRecord + kTag);
    for (size_t got = 0, seq = 0; got < kSize; seq++) {
      uint8_t* at = region ? dst + got : dst;
      ssize_t n;
      if (aead) {
        n = recv(c, rec, kRecord + kTag, MSG_WAITALL);
        if (n != static_cast<ssize_t>(kRecord + kTag) || !Aead(ctx, false, kKey, seq, rec, kRecord, at, rec + kRecord)) _exit(2);
        n = kRecord;
      } else {
        n = recv(c, at, kChunk, MSG_WAITALL);
      }
      if (n <= 0) _exit(1);
      if (rxHash)
        for (ssize_t q = 0; q < n; q += 4096) sum += livemig::PageHash(at + q, 4096);
      got += n;
    }
    double cpu = Cpu() - c0;
    if (write(report[1], &cpu, sizeof cpu) != sizeof cpu || write(c, &sum, 1) != 1) _exit(1);
    _exit(0);
  }
  char r;
  if (read(ready[0], &r, 1) != 1) return 1;
  int s = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a)) return 1;
  double c0 = Cpu(), t0 = Now();
  uint64_t sum = 0;
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  uint8_t* rec = static_cast<uint8_t*>(malloc(kRecord + kTag));
  memset(rec, 0, kRecord + kTag);
  const size_t step = aead ? kRecord : kChunk;
  for (size_t off = 0, seq = 0; off < kSize; off += step, seq++) {
    const uint8_t* from = src + off;
    size_t len = step;
    if (aead) {
      if (!Aead(ctx, true, kKey, seq, src + off, kRecord, rec, rec + kRecord)) return 3;
      from = rec;
      len = kRecord + kTag;
    }
    for (size_t o = 0; o < len;) {
      ssize_t n = send(s, from + o, len - o, 0);
      if (n <= 0) return 1;
      o += n;
    }
    if (txHash)
      for (size_t q = 0; q < step; q += 4096) sum += livemig::PageHash(src + off + q, 4096);
  }
  if (read(s, &r, 1) != 1) return 1;
  double ms = Now() - t0, txCpu = Cpu() - c0, rxCpu = 0;
  if (read(report[0], &rxCpu, sizeof rxCpu) != sizeof rxCpu) return 1;
  wait(nullptr);
  printf("{\"bench\":\"tcp_placement\",\"mode\":\"%s\",\"ms\":%.1f,\"mb_s\":%.0f,\"sender_cpu_s\":%.3f,\"receiver_cpu_s\":%.3f,\"check\":%u}\n", mode, ms,
         kSize / 1e3 / ms, txCpu, rxCpu, static_cast<unsigned>(sum & 1));
  return 0;
}
