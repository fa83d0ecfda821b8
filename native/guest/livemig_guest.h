/*
 * livemig_guest: the guest side of livemig's guest contract (docs/GUEST.md), versions 2 to 4.
 * C11 and libc only. Link it into a VMM (or any process whose memory should move) and:
 *
 *   source host                               destination host
 *   -----------                               ----------------
 *   mmap each region from a memfd             h = lmg_incoming_open(path, ...)
 *   lmg_track(regions, n, ...)   (optional)     (livemig connects, hands over the regions,
 *   s = lmg_source_start(path, regions, n,       they are mapped here: lmg_incoming_regions)
 *                        &ops, ...)           lmg_incoming_wait(h, &ops, ...)
 *   ... run; livemig connects to `path` and     (loads the device state; returns when
 *   calls ops.pause / resume / released ...      livemig says run)
 *                                             ... run
 *
 * The library answers livemig on a thread of its own, so a pause is answered within
 * microseconds whatever the guest's own threads are doing. Every callback runs on that thread.
 * Functions return 0 (or a handle) on success; on failure -1 (or NULL) with a message in `err`
 * (which may be NULL) and errno set.
 */
#ifndef LIVEMIG_GUEST_H
#define LIVEMIG_GUEST_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* the newest contract version this library speaks */
#define LMG_CONTRACT 4
/* the oldest: a hello starts at it (the hello's "contract"; "contractMax" is LMG_CONTRACT) */
#define LMG_CONTRACT_OLDEST 2

/*
 * The contract's one definition: livemig's addon builds from this header too and exports what
 * follows to src/guest/contract.ts, whose copy test/guest-contract.test.ts holds equal.
 */

/* most regions one guest may hand over */
#define LMG_MAX_REGIONS 32
/* most disks one guest may hand over (contract 4) */
#define LMG_MAX_DISKS 16
/* a disk's blocks: what livemig tracks, moves and checks (contract 4) */
#define LMG_DISK_BLOCK 4096u
/* the oldest contract that carries disks: a hello with disks starts at it */
#define LMG_CONTRACT_DISKS 4
/* most descriptors one message carries: a memfd per region, an image and a written-block bitmap per disk */
#define LMG_MAX_FDS (LMG_MAX_REGIONS + 2 * LMG_MAX_DISKS)
/* a name (a guest's, a region's) fits this with its NUL: 1..63 characters of [A-Za-z0-9._-] */
#define LMG_NAME_MAX 64
/* the largest message body (a device state) */
#define LMG_MAX_BODY (64u * 1024 * 1024)
/* the largest hello livemig takes (a JSON object) */
#define LMG_MAX_HELLO (64u * 1024)

/*
 * Every message, both ways: tag u8 | body length u32 LE | body. Descriptors ride on the
 * message's first bytes (SCM_RIGHTS). An answer is the request's tag in lower case, or
 * LMG_TAG_ERROR with a UTF-8 reason.
 */
#define LMG_FRAME_HEAD 5

/* X(NAME, tag): every tag of the contract, requests in upper case, their answers in lower */
#define LMG_TAGS(X)                                                                                \
  X(CONTRACT, 'V') /* contract 3: + u32 LE version, spoken from now on; before any other */        \
  X(CONTRACT_AGREED, 'v')                                                                          \
  X(HELLO, 'H')  /* guest -> livemig, first: JSON (+ a memfd per region, source) */                \
  X(PAUSE, 'P')  /* [+ u32 LE lease ms] */                                                         \
  X(PAUSED, 'p') /* + the device state */                                                          \
  X(COMMIT, 'C') /* livemig commits next: no resuming by itself from now on */                     \
  X(COMMITTED, 'c')                                                                                \
  X(RESUME, 'R')                                                                                   \
  X(RESUMED, 'r')                                                                                  \
  X(THROTTLE, 'T') /* + u8 percent, 0..99 */                                                       \
  X(THROTTLED, 't')                                                                                \
  X(RELEASE, 'X') /* the guest runs at the destination: stop for good */                           \
  X(RELEASED, 'x')                                                                                 \
  X(REGIONS, 'M') /* livemig -> incoming guest: the region (and disk) table + a descriptor each */ \
  X(MAPPED, 'm')                                                                                   \
  X(LOAD_STATE, 'S') /* + the device state */                                                      \
  X(STATE_LOADED, 's')                                                                             \
  X(REGISTER, 'U')   /* post-copy: register for minor faults */                                    \
  X(REGISTERED, 'u') /* + u32 count + count x u64 address, and the userfaultfd */                  \
  X(GO, 'G')                                                                                       \
  X(GOING, 'g')                                                                                    \
  X(ALL_PRESENT, 'A') /* post-copy: every page is in place */                                      \
  X(ALL_PRESENT_ACK, 'a')                                                                          \
  X(DISK_ASKS, 'K') /* post-copy with disks: the socket the VMM asks for blocks on */              \
  X(DISK_ASKS_TAKEN, 'k')                                                                          \
  X(ERROR, 'e') /* + a UTF-8 reason, the answer to a request refused */

#define LMG_TAG_ENUMERATOR_(name, tag) LMG_TAG_##name = tag,
enum lmg_tag { LMG_TAGS(LMG_TAG_ENUMERATOR_) };
#undef LMG_TAG_ENUMERATOR_

/* ---- the framing ------------------------------------------------------------------- */
/*
 * The library serves livemig with these, and livemig's addon reads and writes its own end
 * with them: one implementation of the framing. A guest that speaks the contract itself may
 * use them too. Blocking and non-blocking sockets alike. One reader and one writer at a time
 * on a connection; the two may be different threads.
 */

struct lmg_message {
  uint8_t tag;
  uint8_t *body; /* malloc'd: len bytes, then a NUL (not part of the body) */
  size_t len;
  int fds[LMG_MAX_FDS]; /* descriptors that came with the message (more are closed on arrival) */
  size_t nfds;
};

/* One message; 0, or -1 with errno (EMSGSIZE: over LMG_MAX_BODY or LMG_MAX_FDS; EPIPE: the peer is gone). */
int lmg_message_write(int fd, uint8_t tag, const void *body, size_t len, const int *fds, size_t nfds);

/*
 * One message, within timeout_ms (< 0: no limit), into *m (the caller frees it with
 * lmg_message_free). 0, or -1 with errno: ETIMEDOUT, ECONNRESET (the peer closed), ECANCELED
 * (wake_fd, unless -1, became readable), EPROTO (a body over LMG_MAX_BODY: m->len says what
 * it claimed), ENOMEM, or recvmsg's. On failure *m holds nothing to free.
 */
int lmg_message_read(int fd, struct lmg_message *m, int timeout_ms, int wake_fd);

/* Frees the body and closes the descriptors the caller did not take (set their count to 0 to keep them). */
void lmg_message_free(struct lmg_message *m);

/*
 * The contract version this library was built with (LMG_CONTRACT), and in *oldest (may be NULL)
 * the oldest it still speaks: a VMM linked against a shared copy may check what it got.
 * Any thread, any time.
 */
int lmg_version(int *oldest);

struct lmg_region {
  uint32_t id;             /* unique within the guest */
  char name[LMG_NAME_MAX]; /* e.g. "ram-low" */
  void *addr;              /* this process's mapping (page-aligned) */
  uint64_t size;           /* bytes, a multiple of the page size */
  int fd;                  /* the memfd (or shm) the mapping is of, MAP_SHARED */
  uint64_t offset;         /* where the region starts in fd (page-aligned) */
  int tracked;             /* set by lmg_track: livemig can read exactly which pages were written */
};

/*
 * A disk of the guest (contract 4): an image file or a block device livemig moves with the
 * memory, block by block. On the source the VMM opens it (readable is enough for livemig); on
 * the destination livemig creates the image and hands it over, open read-write.
 */
struct lmg_disk {
  char name[LMG_NAME_MAX]; /* unique among the guest's disks, e.g. "root"; the destination's image is NAME.img */
  uint64_t size;           /* bytes, a multiple of LMG_DISK_BLOCK */
  int fd;                  /* the image or block device */
  /*
   * Set by lmg_disk_track: a bit per block, shared with livemig (a memfd), which reads and
   * clears it atomically each round. NULL: livemig learns what was written itself (by cloning
   * the image on XFS or btrfs, or by hashing every block each round).
   */
  uint64_t *written;
  int written_fd;
};

/*
 * The VMM reports which blocks it writes (the "reported" tracking): lmg_disk_track makes the
 * bitmap; then after each write to the disk completes (the data is in the image: pwrite
 * returned, or the AIO completed), lmg_disk_written(d, offset, length) marks its blocks. A few
 * atomic ORs, no system call. Marking before the write completes would let livemig read the
 * block before the write and never again: mark after. Any thread, any number at once.
 * Before lmg_source_start_disks with this disk (the hello says how each is tracked).
 */
int lmg_disk_track(struct lmg_disk *d, char *err, size_t errlen);
void lmg_disk_written(const struct lmg_disk *d, uint64_t offset, uint64_t length);
/* Drops the bitmap (after lmg_source_stop): livemig no longer reads it. */
void lmg_disk_untrack(struct lmg_disk *d);

/* ---- source side -------------------------------------------------------------------- */

/*
 * Registers every region's mapping with userfaultfd in write-protect async mode (Linux >= 6.7),
 * so livemig reads which pages the guest wrote from /proc/PID/pagemap (exact tracking). Keep
 * *uffd open while the guest may be migrated (closing it ends the tracking). Without it livemig
 * falls back to hashing every page each round (slower; its report says tracking "hash").
 * Any thread; before lmg_source_start with these regions (the hello says which are tracked).
 */
int lmg_track(struct lmg_region *regions, size_t n, int *uffd, char *err, size_t errlen);

/*
 * Post-copy, at the destination: registers every region's mapping for minor faults on a new
 * userfaultfd (*uffd) for livemig to serve (UFFD_FEATURE_MINOR_SHMEM), after dropping the
 * mapping's page table entries so that every first touch faults. lmg_incoming_wait does this
 * itself when livemig asks; a VMM that serves livemig its own way (the QEMU preload library)
 * calls it and hands *uffd over. Any thread, before the guest touches the regions.
 */
int lmg_register_minor(const struct lmg_region *regions, size_t n, int *uffd, char *err, size_t errlen);

struct lmg_source_ops {
  size_t size; /* sizeof(struct lmg_source_ops): lets the struct grow (see Versions above) */
  void *ctx;
  /*
   * Stop the guest (its vCPUs: no write to guest memory after this returns) and return its
   * device state in *state (malloc'd; the library frees it) and *len (<= LMG_MAX_BODY).
   * Return 0, or -1 with a reason in why[whylen] (the migration then fails and the guest
   * keeps running). This is inside the downtime: do nothing else here. A state over
   * LMG_MAX_BODY fails the migration too: the library calls resume at once.
   */
  int (*pause)(void *ctx, uint8_t **state, size_t *len, char *why, size_t whylen);
  /* optional: called right after the pause was answered (still paused) */
  void (*paused)(void *ctx);
  /*
   * Run again on this host: the migration failed, or livemig went silent (or away) while the
   * guest was paused before it committed (the lease, docs/GUEST.md), or lmg_source_stop was
   * called then. Never after "released", nor once livemig committed.
   */
  void (*resume)(void *ctx);
  /* optional: write at (100 - percent)% of the usual rate, percent in 0..99 (auto-converge) */
  int (*throttle)(void *ctx, unsigned percent);
  /* the guest runs at the destination now: stop for good (typically exit the process) */
  void (*released)(void *ctx);
  /* optional: called first on the library's thread (set its scheduling, name it, ...) */
  void (*thread_start)(void *ctx);
};

struct lmg_source;

/*
 * Listens at `path` (a filesystem path, or "@name" for the abstract namespace) and serves
 * livemig there on a thread of its own: each connection gets the hello with every region and
 * its memfd, then pause/commit/resume/throttle/exit requests. One livemig at a time; after a
 * connection ends (a failed migration) the next one may connect. `regions` are copied (their
 * mappings and descriptors must stay valid until lmg_source_stop); so is `ops`. `name` (may be
 * NULL) is shown in livemig's report. Any thread; several handles may serve at once, each at
 * a path of its own.
 */
struct lmg_source *lmg_source_start(const char *path, const char *name, const struct lmg_region *regions, size_t n, const struct lmg_source_ops *ops, char *err,
                                    size_t errlen);

/*
 * The same service, for a guest that registers with a `livemig serve` daemon: the library
 * dials the daemon's guest socket (`livemig serve --guests PATH`) instead of listening, and
 * then speaks exactly as on a connection livemig made (the hello first). The daemon lists the
 * guest by `name` (required, unique on that daemon) while the connection lasts; when it ends
 * (the daemon restarted, or refused the name) the library dials again every half second.
 * To register under another name, stop this handle and register again. Any thread.
 */
struct lmg_source *lmg_source_register(const char *daemon_path, const char *name, const struct lmg_region *regions, size_t n, const struct lmg_source_ops *ops,
                                       char *err, size_t errlen);

/*
 * lmg_source_start and lmg_source_register for a guest with disks (contract 4): the hello
 * names each disk after the regions and carries its image (and its bitmap, when tracked).
 * A pause (ops.pause) then also means no guest write reaches a disk after it returns: the
 * VMM's in-flight I/O completed (and, when tracked, marked) and its own caches written to the
 * image. `disks` are copied; their descriptors and bitmaps must stay valid until
 * lmg_source_stop. ndisks 0 is lmg_source_start / lmg_source_register. A livemig older than
 * contract 4 refuses the hello with the version in its reason.
 */
struct lmg_source *lmg_source_start_disks(const char *path, const char *name, const struct lmg_region *regions, size_t n, const struct lmg_disk *disks,
                                          size_t ndisks, const struct lmg_source_ops *ops, char *err, size_t errlen);
struct lmg_source *lmg_source_register_disks(const char *daemon_path, const char *name, const struct lmg_region *regions, size_t n,
                                             const struct lmg_disk *disks, size_t ndisks, const struct lmg_source_ops *ops, char *err, size_t errlen);

/* what lmg_source_stop left the guest as */
#define LMG_STOPPED 0           /* running here: never paused, or its pause ended (resume was called) */
#define LMG_STOPPED_COMMITTED 1 /* paused after livemig committed: it may run at the destination; only livemig resolve can say */
#define LMG_STOPPED_RELEASED 2  /* released was called: it runs at the destination */

/*
 * Stops serving and frees the handle: the serving thread ends (a callback in progress
 * completes first), the connection to livemig or the daemon closes, the listening socket
 * closes and the path it made is removed (unless another socket took it since). A pause that
 * livemig has not committed ends: resume is called, on the library's thread, before this
 * returns. The same path (or daemon) may then be served again at once.
 * Returns LMG_STOPPED*, or -1 with errno EDEADLK when called from a callback (the library's
 * own thread, which this waits for) and nothing is done. Any other thread, once per handle.
 */
int lmg_source_stop(struct lmg_source *s);

/* ---- destination side --------------------------------------------------------------- */

struct lmg_incoming;

/*
 * Listens at `path`, waits (up to timeout_ms; < 0: forever) for livemig to connect, sends the
 * incoming hello and receives the regions (each a memfd and an offset), which it maps here
 * (and populates, unless livemig advises against it: post-copy, or a same-host upgrade). It
 * also starts the thread that serves livemig once the guest runs. Any thread.
 */
struct lmg_incoming *lmg_incoming_open(const char *path, const char *name, int timeout_ms, char *err, size_t errlen);

/* The regions as mapped here, in the source's order; valid until lmg_incoming_close. Any thread. */
size_t lmg_incoming_regions(const struct lmg_incoming *h, const struct lmg_region **regions);

/*
 * The disks livemig created here for the guest (contract 4), in the source's order, each an
 * image open read-write (written is NULL: lmg_disk_track it to be migrated onward). The blocks
 * are all there, and durable, when lmg_incoming_wait returns 0. The descriptors are the
 * library's until lmg_incoming_close. Any thread.
 */
size_t lmg_incoming_disks(const struct lmg_incoming *h, const struct lmg_disk **disks);

struct lmg_incoming_ops {
  size_t size; /* sizeof(struct lmg_incoming_ops): lets the struct grow (see Versions above) */
  void *ctx;
  /*
   * Check and load the device state (do not run yet). Return 0, or -1 with a reason in
   * why[whylen]: the migration then fails while the source can still resume its guest.
   * Called on the thread in lmg_incoming_wait.
   */
  int (*load_state)(void *ctx, const uint8_t *state, size_t len, char *why, size_t whylen);
  /* optional, post-copy: every page is in place now (faults no longer wait on the network). Called on the library's thread. */
  void (*all_present)(void *ctx);
};

/*
 * Serves livemig on the calling thread until it says run: then returns 0 and the caller runs
 * the guest (the library's thread serves what follows). Returns -1 when livemig went away
 * first: there is no guest to run here. Once per handle, on one thread.
 */
int lmg_incoming_wait(struct lmg_incoming *h, const struct lmg_incoming_ops *ops, char *err, size_t errlen);

/* 1 while pages may still arrive after run (livemig registered the regions for post-copy). Any thread, any time. */
int lmg_incoming_postcopy(const struct lmg_incoming *h);

/*
 * Disk post-copy, for a VMM that asks for its blocks itself. Where the kernel has pre-content
 * events (Linux >= 6.14) every access to an image waits for its blocks anyway; asking first
 * lets the VMM fetch ahead, and overwrite without fetching:
 * - lmg_disk_fetch returns once every block of [offset, offset + length) of disk `disk` (its
 *   index in lmg_incoming_disks) is in the image: a read, or a partial write, is then safe;
 * - lmg_disk_overwrite claims whole blocks (offset and length multiples of LMG_DISK_BLOCK) the
 *   VMM is about to write in full: nothing is fetched, and the source's copy, still to come,
 *   never lands over the write. Call it before the write.
 * 0, or -1 with errno: EINVAL (a range outside the disk, or not whole blocks to overwrite), EIO
 * (livemig went before the blocks came: the guest cannot go on). Outside post-copy, or once
 * every block is here, 0 at once. Any thread, many at once.
 */
int lmg_disk_fetch(struct lmg_incoming *h, size_t disk, uint64_t offset, uint64_t length);
int lmg_disk_overwrite(struct lmg_incoming *h, size_t disk, uint64_t offset, uint64_t length);

/*
 * Stops serving livemig, unmaps the regions and frees the handle (the guest's memory goes
 * with it: call it when the guest is done). Waits for the library's thread, so never from
 * all_present; nor while lmg_incoming_wait runs on another thread. Any other thread.
 */
void lmg_incoming_close(struct lmg_incoming *h);

#ifdef __cplusplus
}
#endif

#endif /* LIVEMIG_GUEST_H */
