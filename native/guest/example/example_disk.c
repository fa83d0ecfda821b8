/* The example guests' checkable disk: see example_disk.h. */
#define _GNU_SOURCE
#include "example_disk.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 4096u
#define WORDS (BLOCK / 8)
#define CHUNK_BLOCKS 256u
#define GOLDEN 0x9E3779B97F4A7C15ull
#define MAGIC 0x314b5349444d474cull /* "LMGDISK1" */
#define LAYOUT_SALT 0x4c41594f5554ull
#define DISK_SALT 0x4449534bull
#define STREAM_SALT 0x53545245414dull

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

/* 0: a hole, 1: data, 2: allocated zeros */
static int chunk_kind(uint64_t seed, uint64_t chunk) {
  uint64_t k = mix(seed ^ chunk ^ LAYOUT_SALT) % 32;
  return k < 4 ? 1 : k == 4 ? 2 : 0;
}

static void block_image(uint64_t seed, uint64_t b, uint64_t k, uint64_t *w) {
  uint64_t base = mix(seed ^ b ^ (k << 40) ^ DISK_SALT), sum = 0;
  for (unsigned i = 4; i < WORDS; i++) {
    w[i] = base + i * GOLDEN;
    sum ^= mix(w[i]);
  }
  w[0] = MAGIC, w[1] = b, w[2] = k, w[3] = sum;
}

static int write_all(int fd, const void *p, size_t n, uint64_t at) {
  for (size_t done = 0; done < n;) {
    ssize_t w = pwrite(fd, (const uint8_t *)p + done, n - done, (off_t)(at + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    done += (size_t)w;
  }
  return 0;
}

static int read_all(int fd, void *p, size_t n, uint64_t at) {
  for (size_t done = 0; done < n;) {
    ssize_t r = pread(fd, (uint8_t *)p + done, n - done, (off_t)(at + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) {
      memset((uint8_t *)p + done, 0, n - done); /* past the end: zeros, as the model would say of a hole */
      return 0;
    }
    done += (size_t)r;
  }
  return 0;
}

uint64_t example_disk_stream_start(uint64_t seed) { return mix(seed ^ STREAM_SALT) | 1; }

int example_disk_create(struct example_disk *x, const char *path, const char *name, uint64_t size, uint64_t seed, char *err, size_t errlen) {
  if (!size || size % BLOCK) return snprintf(err, errlen, "a disk's size must be a positive multiple of %u", BLOCK), errno = EINVAL, -1;
  memset(x, 0, sizeof *x);
  snprintf(x->d.name, sizeof x->d.name, "%s", name);
  x->d.size = size, x->d.written_fd = -1, x->seed = seed, x->xs = example_disk_stream_start(seed);
  int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return snprintf(err, errlen, "%s: %s", path, strerror(errno)), -1;
  uint64_t *buf = malloc((size_t)CHUNK_BLOCKS * BLOCK);
  if (!buf || ftruncate(fd, (off_t)size) != 0) {
    int e = buf ? errno : ENOMEM;
    free(buf), close(fd);
    return snprintf(err, errlen, "%s: %s", path, strerror(e)), errno = e, -1;
  }
  uint64_t blocks = size / BLOCK;
  for (uint64_t c = 0; c * CHUNK_BLOCKS < blocks; c++) {
    int kind = chunk_kind(seed, c);
    if (!kind) continue;
    uint64_t first = c * CHUNK_BLOCKS, n = blocks - first < CHUNK_BLOCKS ? blocks - first : CHUNK_BLOCKS;
    for (uint64_t b = 0; b < n; b++) {
      if (kind == 1) block_image(seed, first + b, 0, buf + b * WORDS);
      else memset(buf + b * WORDS, 0, BLOCK);
    }
    if (write_all(fd, buf, (size_t)(n * BLOCK), first * BLOCK) != 0) {
      int e = errno;
      free(buf), close(fd);
      return snprintf(err, errlen, "writing %s: %s", path, strerror(e)), errno = e, -1;
    }
  }
  free(buf);
  x->d.fd = fd;
  return 0;
}

int example_disk_write(struct example_disk *x) {
  uint64_t w[WORDS], blocks = x->d.size / BLOCK, b = xorshift(&x->xs) % blocks, k = ++x->writes;
  block_image(x->seed, b, k, w);
  if (x->before_write && x->before_write(x->ctx, b * BLOCK, BLOCK) != 0) return -1;
  if (write_all(x->d.fd, w, BLOCK, b * BLOCK) != 0) return -1;
  lmg_disk_written(&x->d, b * BLOCK, BLOCK); /* after the write completed: livemig reads it from here on */
  return 0;
}

int example_disk_flush(const struct example_disk *x) { return fdatasync(x->d.fd); }

int example_disk_check(const struct example_disk *x, struct example_disk_check *out) {
  uint64_t blocks = x->d.size / BLOCK, xs = example_disk_stream_start(x->seed);
  uint64_t *last = calloc(blocks, sizeof *last);
  uint64_t *got = malloc((size_t)CHUNK_BLOCKS * BLOCK), want[WORDS];
  if (!last || !got) return free(last), free(got), errno = ENOMEM, -1;
  for (uint64_t k = 1; k <= x->writes; k++) last[xorshift(&xs) % blocks] = k;
  memset(out, 0, sizeof *out);
  out->first_bad = -1;
  for (uint64_t c = 0; c * CHUNK_BLOCKS < blocks; c++) {
    uint64_t first = c * CHUNK_BLOCKS, n = blocks - first < CHUNK_BLOCKS ? blocks - first : CHUNK_BLOCKS;
    if (read_all(x->d.fd, got, (size_t)(n * BLOCK), first * BLOCK) != 0) return free(last), free(got), -1;
    out->read += n;
    int kind = chunk_kind(x->seed, c);
    for (uint64_t i = 0; i < n; i++) {
      uint64_t b = first + i;
      int same;
      if (last[b] || kind == 1) {
        block_image(x->seed, b, last[b], want);
        same = !memcmp(want, got + i * WORDS, BLOCK);
      } else {
        same = 1;
        for (unsigned j = 0; j < WORDS && same; j++) same = got[i * WORDS + j] == 0;
      }
      if (!same) {
        if (out->first_bad < 0) out->first_bad = (int64_t)b;
        out->bad++;
      }
    }
  }
  free(last), free(got);
  return 0;
}
