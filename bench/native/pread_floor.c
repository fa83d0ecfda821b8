// The least any reader pays to know the content of 1 GiB of populated memfd pages: pread of
// each byte into a 256 KiB buffer that stays in cache, and an all-zero check of each 4 KiB, on
// 1 and on 2 threads, three times. Prints a JSON line per pass. bench/RESULTS.md ("bench/holes")
// sets livemig's idle `zero` migration against it.
//   cc -O2 -march=native -pthread -o build/pread_floor bench/native/pread_floor.c && build/pread_floor
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define REGION ((size_t)1 << 30)
#define CHUNK ((size_t)256 << 10)

static int fd;

struct slice {
  size_t from, to;
  long zero;
};

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void* scan(void* arg) {
  struct slice* s = arg;
  uint8_t* buf = aligned_alloc(4096, CHUNK);
  if (!buf) abort();
  for (size_t at = s->from; at < s->to; at += CHUNK) {
    if (pread(fd, buf, CHUNK, (off_t)at) != (ssize_t)CHUNK) abort();
    for (size_t p = 0; p < CHUNK; p += 4096) {
      uint64_t acc = 0;
      for (size_t i = 0; i < 4096; i += 8) {
        uint64_t w;
        memcpy(&w, buf + p + i, 8);
        acc |= w;
      }
      s->zero += acc == 0;
    }
  }
  free(buf);
  return NULL;
}

int main(void) {
  fd = memfd_create("pread-floor", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, REGION) != 0) return 1;
  uint8_t* m = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED || madvise(m, REGION, 23 /* MADV_POPULATE_WRITE */) != 0) return 1;
  munmap(m, REGION);
  for (int rep = 0; rep < 3; rep++) {
    for (int n = 1; n <= 2; n++) {
      pthread_t t[2];
      struct slice s[2];
      double t0 = now_ms();
      for (int i = 0; i < n; i++) {
        s[i] = (struct slice){REGION / n * i, REGION / n * (i + 1), 0};
        pthread_create(&t[i], NULL, scan, &s[i]);
      }
      long zero = 0;
      for (int i = 0; i < n; i++) pthread_join(t[i], NULL), zero += s[i].zero;
      printf("{\"threads\":%d,\"ms\":%.1f,\"zero_pages\":%ld}\n", n, now_ms() - t0, zero);
    }
  }
  return 0;
}
