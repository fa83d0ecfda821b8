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
 */
/* both entry points are defined here: with 64-bit file offsets (node-gyp's default) the header
   would name mmap mmap64, and the two would clash */
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>

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

static void *track(void *addr, size_t len, int prot, int flags, int fd) {
  if (addr == MAP_FAILED || fd < 0 || !(flags & MAP_SHARED) || !(prot & PROT_WRITE) || !wanted(fd, len)) return addr;
  int saved = errno;
  struct lmg_region r = {.id = 0, .name = "qemu-ram", .addr = addr, .size = (len + 4095) & ~(size_t)4095, .fd = fd, .offset = 0};
  int uffd = -1;
  char err[256];
  pthread_mutex_lock(&lock);
  /* the descriptor stays open for QEMU's lifetime: closing it would unregister the range */
  if (lmg_track(&r, 1, &uffd, err, sizeof err) != 0) fprintf(stderr, "livemig preload: QEMU's RAM at %p (%zu bytes) is not tracked: %s\n", addr, len, err);
  pthread_mutex_unlock(&lock);
  errno = saved;
  return addr;
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
