/*
 * The C example guest: what an integrator writes to plug a VMM into livemig, using only
 * livemig_guest.h. Two memory regions (192 MiB and 64 MiB by default), a checkable pattern
 * written at a given rate, a UDP heartbeat every millisecond, and on the destination a check
 * of every page once it runs there.
 *
 *   c_guest --listen PATH [--sizes 192M,64M] [--rate MIB_S] [--seed N] [--heartbeat HOST:PORT] [--no-track] [--sparse]
 *           [--huge-pages none|thp|hugetlb] [--disk PATH --disk-size SIZE [--disk-rate MB_S] [--no-disk-track]]
 *   c_guest --register DAEMON_PATH --name NAME [same flags]   (listed by a `livemig serve` daemon)
 *   c_guest --incoming PATH [--register DAEMON_PATH --name NAME]   (registers there once it runs: it can move again)
 *
 * Content (docs/GUEST.md, "The C example guest"): word i of page g (pages numbered across
 * the regions in order) holds base + i * GOLDEN, where base = mix(seed ^ g) until the page is
 * first written, and mix(seed ^ g ^ (k << 32) ^ WRITE) after write number k (k >= 1) hit it last.
 * Write k hits page xorshift_k % pages. The device state carries the write stream, so the
 * destination can tell what every page must hold. With --sparse, as most of a real VM's RAM,
 * only one 64 KiB chunk in 16 (mix(seed ^ (g / 16) ^ SPARSE) % 16 == 0) is filled at the start;
 * the other pages stay holes of the memfd, all zero, until a write hits them.
 *
 * With --disk, the guest has a disk too (example_disk.h: its layout, writes and check): an
 * image created at PATH, written with random 4 KiB blocks at --disk-rate MB/s, each write
 * reported to livemig after it completed (unless --no-disk-track: livemig then finds the writes
 * itself). The destination's image is handed over by livemig and checked block by block.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "example_disk.h"
#include "livemig_guest.h"

#define PAGE 4096u
#define HUGE_PAGE (2u << 20)
#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21u << 26) /* log2(2 MiB) << MFD_HUGE_SHIFT */
#endif
#define WORDS (PAGE / 8)
#define GOLDEN 0x9E3779B97F4A7C15ull
#define WRITE_SALT 0x5DEECE66Dull
#define SPARSE_SALT 0x5350415253ull
#define STATE_MAGIC 0x43474d4cu /* "LMGC" */
#define BLOCK_BYTES 4096.0

static uint64_t mix(uint64_t z) {
  z += GOLDEN;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static uint64_t xorshift(uint64_t *s) {
  uint64_t x = *s;
  x ^= x << 13, x ^= x >> 7, x ^= x << 17;
  return *s = x;
}
static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* What moves with the guest: the device state (little-endian on both ends: one host kind). */
struct device_state {
  uint32_t magic, version, regions, throttle;
  uint64_t sizes[2], seed, rate, xs, writes, beat;
  uint64_t sparse;                                     /* 1: most pages never written (below) */
  char heartbeat[48];                                  /* HOST:PORT the beats go to, or empty */
  uint64_t disk_size, disk_rate, disk_xs, disk_writes; /* the disk (0: none): bytes, bytes a second, its write stream */
};

static struct lmg_region regions[2];
static size_t nregions = 2;
static uint64_t pages_total;
static struct device_state st; /* the running guest's state; st.xs/writes/beat change */
static pthread_mutex_t gate = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t unpaused = PTHREAD_COND_INITIALIZER;
static int paused;             /* under gate; a paused vCPU sleeps on `unpaused`, off the CPUs */
static atomic_int writing = 1; /* 0 while a check runs */
static atomic_int all_present;
static int beat_fd = -1;
static struct example_disk disk; /* in use when st.disk_size */
static struct sockaddr_in beat_to;

static uint8_t *page_at(uint64_t g) {
  for (size_t r = 0; r < nregions; r++) {
    uint64_t n = regions[r].size / PAGE;
    if (g < n) return (uint8_t *)regions[r].addr + g * PAGE;
    g -= n;
  }
  return NULL;
}
static uint64_t base_of(uint64_t g, uint64_t k) { return k ? mix(st.seed ^ g ^ (k << 32) ^ WRITE_SALT) : mix(st.seed ^ g); }
/* --sparse: a page never written since the start holds zeros (a hole of its memfd) */
static int untouched(uint64_t g) { return st.sparse && mix(st.seed ^ (g / 16) ^ SPARSE_SALT) % 16 != 0; }
static void fill(uint64_t g, uint64_t k) {
  uint64_t *w = (uint64_t *)page_at(g), b = base_of(g, k);
  for (unsigned i = 0; i < WORDS; i++) w[i] = b + i * GOLDEN;
}

static void beat(const char *extra) {
  if (beat_fd < 0) return;
  char msg[256];
  int n = snprintf(msg, sizeof msg, "{\"seq\":%llu,\"writes\":\"%llu\",\"pid\":%d,\"t\":%.3f%s}", (unsigned long long)st.beat++, (unsigned long long)st.writes,
                   (int)getpid(), now_ms(), extra ? extra : "");
  sendto(beat_fd, msg, (size_t)n, 0, (struct sockaddr *)&beat_to, sizeof beat_to);
}

/* Every page against the write stream replayed from the start; beats go on, writes wait. */
static void check(void) {
  atomic_store(&writing, 0);
  /* the check is the example's, not the guest's work: at the lowest priority it takes no CPU from
   * the guest's vCPU or from livemig finishing the hand-over (as the reference guest's check) */
  pid_t tid = (pid_t)syscall(SYS_gettid);
  int before = getpriority(PRIO_PROCESS, (id_t)tid);
  setpriority(PRIO_PROCESS, (id_t)tid, 19);
  double t0 = now_ms();
  uint64_t *last = calloc(pages_total, sizeof *last), xs = mix(st.seed) | 1;
  for (uint64_t k = 1; k <= st.writes; k++) last[xorshift(&xs) % pages_total] = k;
  uint64_t bad = 0;
  long long first = -1;
  for (uint64_t g = 0; g < pages_total; g++) {
    const uint64_t *w = (const uint64_t *)page_at(g), b = base_of(g, last[g]);
    const int zero = !last[g] && untouched(g);
    for (unsigned i = 0; i < WORDS; i++) {
      if (w[i] != (zero ? 0 : b + i * GOLDEN)) {
        if (first < 0) first = (long long)g;
        bad++;
        break;
      }
    }
  }
  free(last);
  char extra[320], disk_part[160] = "";
  if (st.disk_size) {
    struct example_disk_check c;
    disk.writes = st.disk_writes;
    if (example_disk_check(&disk, &c) != 0) c.bad = UINT64_MAX, c.first_bad = -2;
    snprintf(disk_part, sizeof disk_part, ",\"disk\":{\"bad\":%llu,\"firstBad\":%lld,\"writes\":\"%llu\",\"blocks\":%llu}", (unsigned long long)c.bad,
             (long long)c.first_bad, (unsigned long long)st.disk_writes, (unsigned long long)c.read);
  }
  snprintf(extra, sizeof extra, ",\"verify\":{\"bad\":%llu,\"firstBad\":%lld,\"writes\":\"%llu\",\"ms\":%.1f%s}", (unsigned long long)bad, first,
           (unsigned long long)st.writes, now_ms() - t0, disk_part);
  pthread_mutex_lock(&gate);
  beat(extra);
  pthread_mutex_unlock(&gate);
  atomic_store(&writing, 1);
  setpriority(PRIO_PROCESS, (id_t)tid, before);
}

/* The vCPU: rate MiB/s of whole-page writes in 1 ms ticks, and a beat each tick. */
static void run(void) {
  double start = now_ms(), done = 0, disk_done = 0;
  for (;;) {
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
    pthread_mutex_lock(&gate);
    if (paused) {
      while (paused) pthread_cond_wait(&unpaused, &gate);
      start = now_ms(), done = 0, disk_done = 0; /* resumed: no burst to catch up the paused time */
    }
    {
      double per_ms = (double)st.rate * 256 * (100 - st.throttle) / 100 / 1000, t = now_ms();
      if (!atomic_load(&writing)) start = t, done = 0, disk_done = 0;
      double due = (t - start) * per_ms - done;
      double disk_per_ms = (double)st.disk_rate / BLOCK_BYTES * (100 - st.throttle) / 100 / 1000, disk_due = (t - start) * disk_per_ms - disk_done;
      if (due > per_ms * 10 || disk_due > disk_per_ms * 10) start = t, done = 0, disk_done = 0, due = per_ms, disk_due = disk_per_ms; /* far behind: no burst */
      for (; atomic_load(&writing) && due >= 1; due--, done++) fill(xorshift(&st.xs) % pages_total, ++st.writes);
      /* a disk write is acknowledged when pwrite returns: the pause below waits for it, so it is in the image livemig reads */
      for (; st.disk_size && atomic_load(&writing) && disk_due >= 1; disk_due--, disk_done++) {
        if (example_disk_write(&disk) != 0) perror("c_guest: disk write");
        st.disk_writes = disk.writes, st.disk_xs = disk.xs;
      }
      beat(NULL);
    }
    pthread_mutex_unlock(&gate);
  }
}

/* ---- what livemig asks of the source guest (library thread) ---- */
static int on_pause(void *ctx, uint8_t **state, size_t *len, char *why, size_t whylen) {
  (void)ctx, (void)why, (void)whylen;
  pthread_mutex_lock(&gate); /* a tick in progress completes first */
  paused = 1;
  struct device_state *s = malloc(sizeof *s);
  *s = st;
  pthread_mutex_unlock(&gate);
  s->throttle = 0; /* a throttle is the migration's: wherever the guest resumes, it runs at full rate */
  *state = (uint8_t *)s, *len = sizeof *s;
  return 0;
}
static void on_resume(void *ctx) {
  (void)ctx;
  pthread_mutex_lock(&gate);
  paused = 0, st.throttle = 0;
  pthread_cond_broadcast(&unpaused);
  pthread_mutex_unlock(&gate);
}
static int on_throttle(void *ctx, unsigned percent) {
  (void)ctx;
  st.throttle = percent;
  return 0;
}
static void on_released(void *ctx) {
  (void)ctx;
  _exit(0); /* it runs at the destination now */
}

/* ---- what livemig asks of the incoming guest ---- */
static int on_load_state(void *ctx, const uint8_t *state, size_t len, char *why, size_t whylen) {
  (void)ctx;
  struct device_state s;
  if (len != sizeof s) return snprintf(why, whylen, "device state of %zu bytes, not %zu", len, sizeof s), -1;
  memcpy(&s, state, sizeof s);
  if (s.magic != STATE_MAGIC || s.version != 2) return snprintf(why, whylen, "not a C example guest's state (version 2)"), -1;
  if (s.disk_size != disk.d.size)
    return snprintf(why, whylen, "state for a disk of %llu bytes, livemig handed over %llu", (unsigned long long)s.disk_size, (unsigned long long)disk.d.size),
           -1;
  if (s.regions != nregions || s.sizes[0] != regions[0].size || s.sizes[1] != regions[1].size)
    return snprintf(why, whylen, "state for regions of %llu and %llu bytes", (unsigned long long)s.sizes[0], (unsigned long long)s.sizes[1]), -1;
  st = s;
  return 0;
}
static void on_all_present(void *ctx) {
  (void)ctx;
  atomic_store(&all_present, 1);
}

static uint64_t size_arg(const char *s) {
  char *end;
  uint64_t v = strtoull(s, &end, 10);
  if (*end == 'M') v <<= 20;
  else if (*end == 'G') v <<= 30;
  return v;
}

static void heartbeat_to(const char *hostport) {
  char host[64];
  const char *colon = strrchr(hostport, ':');
  if (!colon || (size_t)(colon - hostport) >= sizeof host) return;
  memcpy(host, hostport, (size_t)(colon - hostport));
  host[colon - hostport] = 0;
  beat_to.sin_family = AF_INET;
  beat_to.sin_port = htons((uint16_t)atoi(colon + 1));
  if (inet_pton(AF_INET, host, &beat_to.sin_addr) == 1) beat_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
}

/* --disk-ask: the disk's blocks asked for ahead, a MiB at a time, while the guest runs: from the
   end back, where livemig's background push, which starts at the beginning, comes last */
static void *fetch_disk(void *h) {
  const uint64_t chunk = 1 << 20;
  for (uint64_t end = st.disk_size; end > 0;) {
    uint64_t at = end > chunk ? end - chunk : 0, n = end - at;
    end = at;
    if (lmg_disk_fetch(h, 0, at, n) != 0) {
      fprintf(stderr, "c_guest: lmg_disk_fetch at %llu: %s\n", (unsigned long long)at, strerror(errno));
      break;
    }
  }
  return NULL;
}

static int claim_block(void *h, uint64_t offset, uint64_t length) { return lmg_disk_overwrite(h, 0, offset, length); }

static int usage(void) {
  fprintf(stderr,
          "usage: c_guest --listen PATH [--sizes 192M,64M] [--rate MIB_S] [--seed N] [--heartbeat HOST:PORT] [--no-track] [--sparse]\n"
          "               [--huge-pages none|thp|hugetlb]\n"
          "         --huge-pages: the regions' pages: 4 KiB shmem (none, the default), shmem advised for transparent huge\n"
          "         pages (thp; the host's shmem_enabled decides), or 2 MiB hugetlbfs pages (hugetlb; sizes multiples of 2M)\n"
          "       [--disk PATH --disk-size SIZE [--disk-rate MB_S] [--no-disk-track]]\n"
          "         --disk: a disk image created at PATH (SIZE bytes, K/M/G), written with random 4 KiB blocks at --disk-rate\n"
          "         MB/s (default 0), each reported to livemig unless --no-disk-track\n"
          "       c_guest --register DAEMON_PATH --name NAME [the same flags]\n"
          "       c_guest --incoming PATH [--register DAEMON_PATH --name NAME] [--disk-ask]\n"
          "         --disk-ask: in post-copy, ask livemig for the disk's blocks (lmg_disk_fetch, ahead of the check) and\n"
          "         claim each block before writing it whole (lmg_disk_overwrite), as a VMM linking the library may\n");
  return 2;
}

int main(int argc, char **argv) {
  const char *listen = NULL, *incoming = NULL, *sizes = "192M,64M", *hb = NULL, *daemon = NULL, *name = "c-guest";
  uint64_t rate = 64, seed = 1;
  int track = 1, sparse = 0, disk_track = 1, disk_ask = 0;
  const char *huge = "none", *disk_path = NULL;
  uint64_t disk_size = 0, disk_rate = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--no-track")) track = 0;
    else if (!strcmp(a, "--sparse")) sparse = 1;
    else if (!strcmp(a, "--no-disk-track")) disk_track = 0;
    else if (!strcmp(a, "--disk-ask")) disk_ask = 1;
    else if (!v) return usage();
    else if (!strcmp(a, "--listen")) listen = v, i++;
    else if (!strcmp(a, "--incoming")) incoming = v, i++;
    else if (!strcmp(a, "--register")) daemon = v, i++;
    else if (!strcmp(a, "--name")) name = v, i++;
    else if (!strcmp(a, "--sizes")) sizes = v, i++;
    else if (!strcmp(a, "--rate")) rate = strtoull(v, NULL, 10), i++;
    else if (!strcmp(a, "--seed")) seed = strtoull(v, NULL, 10), i++;
    else if (!strcmp(a, "--heartbeat")) hb = v, i++;
    else if (!strcmp(a, "--huge-pages")) huge = v, i++;
    else if (!strcmp(a, "--disk")) disk_path = v, i++;
    else if (!strcmp(a, "--disk-size")) disk_size = size_arg(v), i++;
    else if (!strcmp(a, "--disk-rate")) disk_rate = (uint64_t)(strtod(v, NULL) * 1e6), i++;
    else return usage();
  }
  if ((listen != NULL) + (incoming != NULL) + (daemon != NULL && !incoming) != 1) return usage();
  char err[512];
  struct lmg_source_ops source_ops = {.size = sizeof source_ops, .pause = on_pause, .resume = on_resume, .throttle = on_throttle, .released = on_released};
  if (incoming) {
    struct lmg_incoming *h = lmg_incoming_open(incoming, "c-guest", 120000, err, sizeof err);
    if (!h) return fprintf(stderr, "c_guest: %s\n", err), 1;
    const struct lmg_region *got;
    if (lmg_incoming_regions(h, &got) != 2) return fprintf(stderr, "c_guest: expected 2 regions\n"), 1;
    memcpy(regions, got, sizeof regions);
    pages_total = (regions[0].size + regions[1].size) / PAGE;
    const struct lmg_disk *disks;
    size_t nd = lmg_incoming_disks(h, &disks);
    if (nd > 1) return fprintf(stderr, "c_guest: expected at most 1 disk, got %zu\n", nd), 1;
    if (nd) disk.d = disks[0]; /* the library's descriptor, open until lmg_incoming_close */
    struct lmg_incoming_ops ops = {.size = sizeof ops, .load_state = on_load_state, .all_present = on_all_present};
    if (lmg_incoming_wait(h, &ops, err, sizeof err) != 0) return 0; /* livemig gave up: no guest to run here */
    disk.seed = st.seed, disk.xs = st.disk_xs, disk.writes = st.disk_writes;
    st.heartbeat[sizeof st.heartbeat - 1] = 0;
    if (st.heartbeat[0]) heartbeat_to(st.heartbeat); /* the source's address for them came with the state */
    int postcopy = lmg_incoming_postcopy(h);
    pthread_t fetcher;
    int fetching = postcopy && disk_ask && st.disk_size && pthread_create(&fetcher, NULL, fetch_disk, h) == 0;
    if (postcopy && disk_ask) disk.before_write = claim_block, disk.ctx = h;
    pthread_t vcpu;
    /* a VMM asking for its blocks writes its disk while they arrive: the claims are what is tested */
    atomic_store(&writing, postcopy && disk_ask);
    pthread_create(&vcpu, NULL, (void *(*)(void *))run, NULL);
    while (postcopy && !atomic_load(&all_present)) usleep(1000); /* post-copy: check once every page is here */
    if (fetching) pthread_join(fetcher, NULL);
    check();
    if (daemon) {
      /* serve again, from the memory livemig handed over (post-copy's registration is gone once every page is here) */
      int uffd = -1;
      if (track && lmg_track(regions, 2, &uffd, err, sizeof err) != 0) fprintf(stderr, "c_guest: running unregistered: %s\n", err);
      else if (st.disk_size && disk_track && lmg_disk_track(&disk.d, err, sizeof err) != 0) fprintf(stderr, "c_guest: running unregistered: %s\n", err);
      else if (!lmg_source_register_disks(daemon, name, regions, 2, &disk.d, st.disk_size ? 1 : 0, &source_ops, err, sizeof err))
        fprintf(stderr, "c_guest: running unregistered: %s\n", err);
    }
    pthread_join(vcpu, NULL);
    return 0;
  }
  uint64_t s0 = size_arg(sizes), s1 = strchr(sizes, ',') ? size_arg(strchr(sizes, ',') + 1) : 0;
  if (!s0 || !s1 || s0 % PAGE || s1 % PAGE) return fprintf(stderr, "c_guest: --sizes must be two page multiples, e.g. 192M,64M\n"), 2;
  int hugetlb = !strcmp(huge, "hugetlb"), thp = !strcmp(huge, "thp");
  if (!hugetlb && !thp && strcmp(huge, "none")) return usage();
  if (hugetlb && (s0 % HUGE_PAGE || s1 % HUGE_PAGE)) return fprintf(stderr, "c_guest: --huge-pages hugetlb: --sizes must be multiples of 2M\n"), 2;
  const char *names[2] = {"ram-low", "ram-high"};
  for (int r = 0; r < 2; r++) {
    uint64_t size = r ? s1 : s0;
    /* hugetlbfs: 2 MiB pages from the host's pool (vm.nr_hugepages); mmap fails when it is short */
    int fd = memfd_create(names[r], MFD_CLOEXEC | (hugetlb ? MFD_HUGETLB | MFD_HUGE_2MB : 0));
    if (fd < 0 || ftruncate(fd, (off_t)size) != 0) return perror("memfd"), 1;
    void *a = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (a == MAP_FAILED) return perror(hugetlb ? "mmap (hugetlbfs: are enough huge pages reserved?)" : "mmap"), 1;
    /* shmem THP: the kernel gives huge pages to advised mappings where shmem_enabled says advise (or always) */
    if (thp && madvise(a, size, MADV_HUGEPAGE) != 0) return perror("madvise(MADV_HUGEPAGE)"), 1;
    regions[r] = (struct lmg_region){.id = (uint32_t)r, .addr = a, .size = size, .fd = fd, .offset = 0};
    snprintf(regions[r].name, sizeof regions[r].name, "%s", names[r]);
  }
  pages_total = (s0 + s1) / PAGE;
  st = (struct device_state){.magic = STATE_MAGIC, .version = 2, .regions = 2, .sizes = {s0, s1}, .seed = seed, .rate = rate, .xs = mix(seed) | 1};
  st.sparse = (uint64_t)sparse;
  if (disk_path || disk_size) {
    if (!disk_path || !disk_size) return fprintf(stderr, "c_guest: --disk PATH and --disk-size SIZE go together\n"), 2;
    if (example_disk_create(&disk, disk_path, "disk0", disk_size, seed, err, sizeof err) != 0) return fprintf(stderr, "c_guest: %s\n", err), 1;
    if (disk_track && lmg_disk_track(&disk.d, err, sizeof err) != 0) return fprintf(stderr, "c_guest: %s\n", err), 1;
    st.disk_size = disk_size, st.disk_rate = disk_rate, st.disk_xs = disk.xs;
  }
  for (uint64_t g = 0; g < pages_total; g++)
    if (!untouched(g)) fill(g, 0);
  if (hb) heartbeat_to(hb), snprintf(st.heartbeat, sizeof st.heartbeat, "%s", hb);
  int uffd = -1;
  if (track && lmg_track(regions, 2, &uffd, err, sizeof err) != 0) return fprintf(stderr, "c_guest: %s\n", err), 1;
  size_t nd = st.disk_size ? 1 : 0;
  struct lmg_source *served = daemon ? lmg_source_register_disks(daemon, name, regions, 2, &disk.d, nd, &source_ops, err, sizeof err)
                                     : lmg_source_start_disks(listen, name, regions, 2, &disk.d, nd, &source_ops, err, sizeof err);
  if (!served) return fprintf(stderr, "c_guest: %s\n", err), 1;
  printf("{\"guest\":{\"socket\":\"%s\",\"pid\":%d,\"bytes\":%llu}}\n", daemon ? daemon : listen, (int)getpid(), (unsigned long long)(s0 + s1));
  fflush(stdout);
  run();
  return 0;
}
