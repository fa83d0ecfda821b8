// What a TCP receiver pays to place bytes into a large region instead of a reused buffer.
// One process pair on loopback moves 1 GiB with 1 MiB sends from a populated memfd; the
// receiver either discards into a 1 MiB buffer (the raw ceiling), receives straight into a
// populated 1 GiB memfd region (what livemig's receiver does), or does that and hashes every
// page with PageHash as it lands (livemig's receiver, minus framing). The sender optionally
// hashes every page too (livemig's sender). Prints one JSON line per run.
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

#include "../../native/pagehash.h"

static const size_t kSize = 1UL << 30, kChunk = 1UL << 20;

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
  bool region = strcmp(mode, "buffer") != 0, rxHash = strstr(mode, "hash") != nullptr, txHash = strcmp(mode, "both-hash") == 0;
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
    for (size_t got = 0; got < kSize;) {
      uint8_t* at = region ? dst + got : dst;
      ssize_t n = recv(c, at, kChunk, MSG_WAITALL);
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
  for (size_t off = 0; off < kSize; off += kChunk) {
    for (size_t o = 0; o < kChunk;) {
      ssize_t n = send(s, src + off + o, kChunk - o, 0);
      if (n <= 0) return 1;
      o += n;
    }
    if (txHash)
      for (size_t q = 0; q < kChunk; q += 4096) sum += livemig::PageHash(src + off + q, 4096);
  }
  if (read(s, &r, 1) != 1) return 1;
  double ms = Now() - t0, txCpu = Cpu() - c0, rxCpu = 0;
  if (read(report[0], &rxCpu, sizeof rxCpu) != sizeof rxCpu) return 1;
  wait(nullptr);
  printf("{\"bench\":\"tcp_placement\",\"mode\":\"%s\",\"ms\":%.1f,\"mb_s\":%.0f,\"sender_cpu_s\":%.3f,\"receiver_cpu_s\":%.3f,\"check\":%u}\n", mode, ms, kSize / 1e3 / ms, txCpu, rxCpu,
         static_cast<unsigned>(sum & 1));
  return 0;
}
