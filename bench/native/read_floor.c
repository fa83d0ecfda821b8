// The least any reader pays to know the content of 1 GiB of populated memfd pages, two ways, on
// 1 and on 2 threads, three times each: `pread` of each byte into a 256 KiB buffer that stays in
// cache and an all-zero check of each 4 KiB (livemig's read through the files), and the same
// check where the pages lie, through a mapping populated beforehand (MADV_POPULATE_READ, timed
// apart: livemig's read through its mapping). Prints a JSON line per pass. bench/holes runs it
// (built by binding.gyp) and bench/RESULTS.md sets the idle `zero` migration against it.
//   build/Release/read_floor [MiB]
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CHUNK ((size_t)256 << 10)
#define PAGE 4096

static int fd;
static const uint8_t* mapped;
static size_t region;

struct slice {
  size_t from, to;
  long zero;
};

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int all_zero(const uint8_t* p) {
  uint64_t acc = 0;
  for (size_t i = 0; i < PAGE; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    acc |= w;
  }
  return acc == 0;
}

static void* scan_files(void* arg) {
  struct slice* s = arg;
  uint8_t* buf = aligned_alloc(PAGE, CHUNK);
  if (!buf) abort();
  for (size_t at = s->from; at < s->to; at += CHUNK) {
    if (pread(fd, buf, CHUNK, (off_t)at) != (ssize_t)CHUNK) abort();
    for (size_t p = 0; p < CHUNK; p += PAGE) s->zero += all_zero(buf + p);
  }
  free(buf);
  return NULL;
}

static void* scan_mapping(void* arg) {
  struct slice* s = arg;
  for (size_t at = s->from; at < s->to; at += PAGE) s->zero += all_zero(mapped + at);
  return NULL;
}

static void pass(const char* via, void* (*scan)(void*), int n, double extra_ms) {
  pthread_t t[2];
  struct slice s[2];
  double t0 = now_ms();
  for (int i = 0; i < n; i++) {
    s[i] = (struct slice){region / n * i, region / n * (i + 1), 0};
    pthread_create(&t[i], NULL, scan, &s[i]);
  }
  long zero = 0;
  for (int i = 0; i < n; i++) pthread_join(t[i], NULL), zero += s[i].zero;
  printf("{\"via\":\"%s\",\"threads\":%d,\"ms\":%.1f,\"populate_ms\":%.1f,\"zero_pages\":%ld}\n", via, n, now_ms() - t0, extra_ms, zero);
  fflush(stdout);
}

int main(int argc, char** argv) {
  region = (size_t)(argc > 1 ? atol(argv[1]) : 1024) << 20;
  fd = memfd_create("read-floor", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, (off_t)region) != 0) return 1;
  uint8_t* m = mmap(NULL, region, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED || madvise(m, region, 23 /* MADV_POPULATE_WRITE */) != 0) return 1;
  munmap(m, region);
  for (int rep = 0; rep < 3; rep++) {
    for (int n = 1; n <= 2; n++) {
      pass("files", scan_files, n, 0);
      // a new mapping each pass, as a migration's source makes one per migration
      double t0 = now_ms();
      mapped = mmap(NULL, region, PROT_READ, MAP_SHARED, fd, 0);
      if (mapped == MAP_FAILED || madvise((void*)mapped, region, 22 /* MADV_POPULATE_READ */) != 0) return 1;
      pass("mapping", scan_mapping, n, now_ms() - t0);
      munmap((void*)mapped, region);
    }
  }
  return 0;
}
