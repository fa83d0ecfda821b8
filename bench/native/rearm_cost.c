// What one pre-copy collect costs: PAGEMAP_SCAN over a 1 GiB shared mapping under userfaultfd
// write protection (async), reporting the written pages and protecting them again, as
// native/tracking does each round. N pages are written at random between scans, by this process
// (nothing else runs) and by a second thread that keeps writing 16 pages a millisecond during
// the scan too (a running guest). A last scan reports without protecting (the pause's, with the
// guest stopped). Prints a JSON line per case: the scan's ms and its us per written page.
//   cc -O2 -pthread -o build/rearm_cost bench/native/rearm_cost.c && build/rearm_cost
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef PAGEMAP_SCAN
struct page_region {
  uint64_t start, end, categories;
};
struct pm_scan_arg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages, category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#define PAGE_IS_WRITTEN (1 << 1)
#endif

#define REGION ((size_t)1 << 30)
#define PAGES (REGION / 4096)

static uint8_t *mem;
static volatile int writing;

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

static void write_random(size_t n, unsigned *seed) {
  for (size_t i = 0; i < n; i++) mem[(size_t)(rand_r(seed) % PAGES) * 4096 + 8] += 1;
}

// A guest: 16 pages a millisecond, scattered, while `writing`.
static void *guest(void *arg) {
  unsigned seed = 7;
  (void)arg;
  while (writing) {
    write_random(16, &seed);
    usleep(1000);
  }
  return NULL;
}

static double scan(int pm, int protect, long *found) {
  static struct page_region vec[4096];
  double t0 = now_ms();
  uint64_t at = (uint64_t)mem, end = at + REGION;
  *found = 0;
  while (at < end) {
    struct pm_scan_arg a = {.size = sizeof a,
                            .flags = PM_SCAN_CHECK_WPASYNC | (protect ? PM_SCAN_WP_MATCHING : 0),
                            .start = at,
                            .end = end,
                            .vec = (uint64_t)vec,
                            .vec_len = 4096,
                            .category_mask = PAGE_IS_WRITTEN,
                            .return_mask = PAGE_IS_WRITTEN};
    long n = ioctl(pm, PAGEMAP_SCAN, &a);
    if (n < 0) die("PAGEMAP_SCAN");
    for (long i = 0; i < n; i++) *found += (long)((vec[i].end - vec[i].start) / 4096);
    at = a.walk_end;
  }
  return now_ms() - t0;
}

int main(void) {
  int fd = memfd_create("rearm", 0);
  if (fd < 0 || ftruncate(fd, REGION) != 0) die("memfd");
  mem = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  if (mem == MAP_FAILED) die("mmap");
  for (size_t i = 0; i < REGION; i += 4096) mem[i] = 1;
  int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (uffd < 0) die("userfaultfd");
  struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED};
  if (ioctl(uffd, UFFDIO_API, &api) != 0) die("UFFDIO_API");
  struct uffdio_register reg = {.range = {(uint64_t)mem, REGION}, .mode = UFFDIO_REGISTER_MODE_WP};
  if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0) die("UFFDIO_REGISTER");
  struct uffdio_writeprotect wp = {.range = {(uint64_t)mem, REGION}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
  if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0) die("UFFDIO_WRITEPROTECT");
  int pm = open("/proc/self/pagemap", O_RDONLY);
  if (pm < 0) die("pagemap");
  long found;
  unsigned seed = 1;
  const size_t counts[] = {0, 64, 256, 1024};
  for (int pass = 0; pass < 3; pass++) {
    for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
      for (int running = 0; running < 2; running++) {
        pthread_t t;
        scan(pm, 1, &found);  // everything protected again
        write_random(counts[c], &seed);
        writing = running;
        if (running && pthread_create(&t, NULL, guest, NULL) != 0) die("pthread_create");
        if (running) usleep(2000);
        double ms = scan(pm, 1, &found);
        writing = 0;
        if (running) pthread_join(t, NULL);
        printf("{\"case\":\"collect\",\"guest\":\"%s\",\"written\":%zu,\"found\":%ld,\"ms\":%.3f,\"us_per_page\":%.1f}\n", running ? "running" : "idle",
               counts[c], found, ms, found ? ms * 1e3 / (double)found : 0.0);
      }
      write_random(counts[c], &seed);
      double ms = scan(pm, 0, &found);
      printf("{\"case\":\"final collect\",\"written\":%zu,\"found\":%ld,\"ms\":%.3f}\n", counts[c], found, ms);
    }
  }
  return 0;
}
