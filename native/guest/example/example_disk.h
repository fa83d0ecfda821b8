/*
 * A checkable disk for the example guests (the C example guest and the reference guest): an
 * image with a realistic layout, random 4 KiB writes that livemig is told of
 * (lmg_disk_written), and a check of every block against the write stream replayed.
 *
 * Layout at the start, per 1 MiB chunk c: mix(seed ^ c ^ LAYOUT) % 32 is 0..3: data (an eighth
 * of the disk), 4: allocated zeros (a thirty-second), else a hole. Block b written k times last
 * holds the block image of (b, k); a data block never written holds (b, 0); any other block
 * never written reads as zeros. A block image: the words {MAGIC, b, k, checksum}, then word i
 * (i >= 4) = mix(seed ^ b ^ (k << 40) ^ DISK) + i * GOLDEN; checksum = the xor of mix(word i).
 * Write k (k >= 1) hits block xorshift_k % blocks, the stream seeded with mix(seed ^ STREAM) | 1.
 */
#ifndef LIVEMIG_EXAMPLE_DISK_H
#define LIVEMIG_EXAMPLE_DISK_H

#include <stddef.h>
#include <stdint.h>

#include "livemig_guest.h"

#ifdef __cplusplus
extern "C" {
#endif

struct example_disk {
  struct lmg_disk d; /* name, size, fd, and the written-block bitmap when tracked */
  uint64_t seed;
  uint64_t xs;     /* the write stream's state */
  uint64_t writes; /* writes made so far */
  /* optional, before each write of a whole block: a destination VMM in post-copy claims it
     (lmg_disk_overwrite), so the write waits for no fetch. 0, or -1 with errno */
  int (*before_write)(void *ctx, uint64_t offset, uint64_t length);
  void *ctx;
};

/* Creates (or replaces) the image at path, `size` bytes of the layout above, and opens it read-write. */
int example_disk_create(struct example_disk *x, const char *path, const char *name, uint64_t size, uint64_t seed, char *err, size_t errlen);
/* The stream's state before its first write. */
uint64_t example_disk_stream_start(uint64_t seed);
/* The next write: one block, written (pwrite) and then marked for livemig. 0, or -1 with errno. */
int example_disk_write(struct example_disk *x);
/* Makes the writes so far durable (fdatasync): a pause's flush. */
int example_disk_flush(const struct example_disk *x);

struct example_disk_check {
  uint64_t bad;      /* blocks that differ from the model */
  int64_t first_bad; /* the first of them, or -1 */
  uint64_t read;     /* blocks read */
};
/* Every block of the image against the model after x->writes writes. 0, or -1 with errno. */
int example_disk_check(const struct example_disk *x, struct example_disk_check *out);

#ifdef __cplusplus
}
#endif

#endif
