/*
 * livemig's preload library for QEMU (docs/QEMU.md): loaded into QEMU with LD_PRELOAD, it
 * registers QEMU's shared mappings of its RAM files for userfaultfd write protection in async
 * mode, the way the guest library does for a VMM that links it (lmg_track). The kernel then
 * resolves QEMU's write faults itself, and livemig reads exactly which pages QEMU wrote with
 * PAGEMAP_SCAN on /proc/QEMU_PID/pagemap: no change to QEMU, no cost to a write but the first
 * after each collection.
 *
 * Which files: LIVEMIG_QEMU_RAM, colon-separated paths (the memory backends' mem-path), matched
 * by device and inode when QEMU maps them shared. Unset, every shared mapping of a regular file
 * of at least LIVEMIG_QEMU_RAM_MIN_MIB (default 64) MiB is taken: QEMU maps nothing else that
 * large and shared. A failure is printed and QEMU runs on untracked (livemig then hashes, and
 * says why).
 *
 * At a destination livemig started, LIVEMIG_QEMU_CONTROL_FD names a socket to livemig on which a
 * thread of this library answers the guest contract's post-copy requests for QEMU: REGISTER
 * (the RAM mapping's write tracking ends, the mapping is registered for minor faults on a new
 * userfaultfd, which goes to livemig with the mapping's address) and ALL_PRESENT (post-copy is
 * over: the writes are tracked again, for the VM's next migration).
 */
/* both entry points are defined here: with 64-bit file offsets (node-gyp's default) the header
   would name mmap mmap64, and the two would clash */
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "livemig_guest.h"

#define EXPORT __attribute__((visibility("default")))

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef void *(*mmap64_fn)(void *, size_t, int, int, int, off64_t);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Whether the file behind fd is one of the RAM files to track. */
static int wanted(int fd, size_t len) {
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
  const char *list = getenv("LIVEMIG_QEMU_RAM");
  if (!list || !*list) {
    const char *min = getenv("LIVEMIG_QEMU_RAM_MIN_MIB");
    unsigned long mib = min && *min ? strtoul(min, NULL, 10) : 64;
    return len >= ((size_t)mib << 20);
  }
  char path[4096];
  for (const char *p = list; *p;) {
    const char *end = strchr(p, ':');
    size_t n = end ? (size_t)(end - p) : strlen(p);
    if (n > 0 && n < sizeof path) {
      memcpy(path, p, n);
      path[n] = 0;
      struct stat want;
      if (stat(path, &want) == 0 && want.st_dev == st.st_dev && want.st_ino == st.st_ino) return 1;
    }
    p += n + (end != NULL);
  }
  return 0;
}

/* the first RAM mapping taken (the one post-copy serves), and the tracking of its writes (-1: none) */
static struct lmg_region ram;
static int ram_mapped;
static int wp_uffd = -1;

static void start_serving(void);

/* Under the lock. The descriptor stays open while tracking lasts: closing it unregisters the range. */
static int start_tracking(struct lmg_region *r, char *err, size_t errlen) { return lmg_track(r, 1, &wp_uffd, err, errlen); }

static void *track(void *addr, size_t len, int prot, int flags, int fd) {
  if (addr == MAP_FAILED || fd < 0 || !(flags & MAP_SHARED) || !(prot & PROT_WRITE) || !wanted(fd, len)) return addr;
  int saved = errno;
  struct lmg_region r = {.id = 0, .name = "qemu-ram", .addr = addr, .size = (len + 4095) & ~(size_t)4095, .fd = fd, .offset = 0};
  char err[256];
  pthread_mutex_lock(&lock);
  if (!ram_mapped) {
    ram = r;
    ram_mapped = 1;
    start_serving();
  }
  int tracked = ram.addr == addr ? start_tracking(&ram, err, sizeof err) : lmg_track(&r, 1, &(int){-1}, err, sizeof err);
  if (tracked != 0) fprintf(stderr, "livemig preload: QEMU's RAM at %p (%zu bytes) is not tracked: %s\n", addr, len, err);
  pthread_mutex_unlock(&lock);
  errno = saved;
  return addr;
}

/* REGISTER: tracking ends (one userfaultfd context per range), minor faults go to livemig. */
static void register_minor(int control) {
  char why[256];
  int uffd = -1;
  pthread_mutex_lock(&lock);
  int ok = ram_mapped;
  if (!ok) snprintf(why, sizeof why, "QEMU has mapped no RAM file (is LIVEMIG_QEMU_RAM its mem-path?)");
  if (ok && wp_uffd >= 0) {
    close(wp_uffd);
    wp_uffd = -1;
  }
  if (ok) ok = lmg_register_minor(&ram, 1, &uffd, why, sizeof why) == 0;
  uint8_t body[12] = {1, 0, 0, 0};
  for (int b = 0; b < 8; b++) body[4 + b] = (uint8_t)((uint64_t)(uintptr_t)ram.addr >> (8 * b));
  pthread_mutex_unlock(&lock);
  if (!ok) {
    lmg_message_write(control, LMG_TAG_ERROR, why, strlen(why), NULL, 0);
    return;
  }
  lmg_message_write(control, LMG_TAG_REGISTERED, body, sizeof body, &uffd, 1);
  close(uffd); /* livemig's copy holds the registration; when it closes that, the range is free again */
}

/* ALL_PRESENT: every page is here and livemig let go of its userfaultfd; the writes are tracked again. */
static void track_again(int control) {
  char why[256] = "";
  pthread_mutex_lock(&lock);
  int ok = ram_mapped && wp_uffd < 0 && start_tracking(&ram, why, sizeof why) == 0;
  pthread_mutex_unlock(&lock);
  if (ok) lmg_message_write(control, LMG_TAG_ALL_PRESENT_ACK, NULL, 0, NULL, 0);
  else lmg_message_write(control, LMG_TAG_ERROR, why, strlen(why), NULL, 0);
}

/* Answers livemig until it closes its end (the VM runs on; nothing more to serve). */
static void *serve_livemig(void *arg) {
  int control = (int)(intptr_t)arg;
  for (;;) {
    struct lmg_message m;
    if (lmg_message_read(control, &m, -1, -1) != 0) break;
    if (m.tag == LMG_TAG_REGISTER) register_minor(control);
    else if (m.tag == LMG_TAG_ALL_PRESENT) track_again(control);
    else lmg_message_write(control, LMG_TAG_ERROR, "not a request of QEMU's preload library", 39, NULL, 0);
    lmg_message_free(&m);
  }
  close(control);
  return NULL;
}

/*
 * Under the lock, once QEMU mapped its RAM: the thread that serves livemig starts then, not at
 * load. The library is loaded into every process of the environment (a shell that execs QEMU,
 * QEMU's own helpers) and only QEMU maps the RAM file; the socket goes to no child of QEMU.
 */
static void start_serving(void) {
  static int started;
  const char *raw = getenv("LIVEMIG_QEMU_CONTROL_FD");
  if (started || !raw || !*raw) return;
  started = 1;
  char *end;
  long fd = strtol(raw, &end, 10);
  if (*end || fd < 3 || fd > 1 << 20 || fcntl((int)fd, F_SETFD, FD_CLOEXEC) != 0) {
    fprintf(stderr, "livemig preload: LIVEMIG_QEMU_CONTROL_FD=%s is not a descriptor\n", raw);
    return;
  }
  pthread_t t;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  /* every signal blocked in the thread: a process-wide signal QEMU takes through a signalfd
     must never find this thread open to it */
  sigset_t all, before;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &before);
  int e = pthread_create(&t, &attr, serve_livemig, (void *)(intptr_t)fd);
  pthread_sigmask(SIG_SETMASK, &before, NULL);
  pthread_attr_destroy(&attr);
  if (e != 0) fprintf(stderr, "livemig preload: no thread to serve livemig: %s\n", strerror(e));
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t offset) {
  static mmap_fn real;
  if (!real) real = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
  return track(real(addr, len, prot, flags, fd, offset), len, prot, flags, fd);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t offset) {
  static mmap64_fn real;
  if (!real) real = (mmap64_fn)dlsym(RTLD_NEXT, "mmap64");
  return track(real(addr, len, prot, flags, fd, offset), len, prot, flags, fd);
}
