/* livemig_guest: the guest side of the guest contract (livemig_guest.h; docs/GUEST.md). */
#define _GNU_SOURCE
#include "livemig_guest.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
/* older kernel headers (Debian 12's) predate these (Linux 6.7); values from the uapi */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

#define PAGE 4096u

static int fail(char *err, size_t errlen, int e, const char *fmt, ...) {
  if (err && errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  errno = e;
  return -1;
}

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t le(const uint8_t *p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

static int valid_name(const char *s) {
  size_t n = strnlen(s, LMG_NAME_MAX);
  if (n == 0 || n >= LMG_NAME_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) return 0;
  }
  return 1;
}

/* ---- the framing ------------------------------------------------------------------- */

/*
 * Waits until fd is ready for `events`: 0, or ETIMEDOUT past the deadline (ms on
 * CLOCK_MONOTONIC; < 0: none), ECANCELED once wake_fd (if >= 0) is readable, or poll's errno.
 */
static int wait_ready(int fd, short events, double deadline, int wake_fd) {
  for (;;) {
    int wait_ms = -1;
    if (deadline >= 0) {
      double left = deadline - now_ms();
      if (left <= 0) return ETIMEDOUT;
      wait_ms = left >= INT_MAX - 1 ? INT_MAX : (int)left + 1;
    }
    struct pollfd p[2] = {{fd, events, 0}, {wake_fd, POLLIN, 0}};
    int r = poll(p, wake_fd >= 0 ? 2 : 1, wait_ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    if (wake_fd >= 0 && p[1].revents) return ECANCELED;
    if (r > 0) return 0; /* POLLHUP and POLLERR too: the next call on fd says what happened */
  }
}

int lmg_message_write(int fd, uint8_t tag, const void *body, size_t len, const int *fds, size_t nfds) {
  if (len > LMG_MAX_BODY || nfds > LMG_MAX_FDS) return errno = EMSGSIZE, -1;
  if ((len && !body) || (nfds && !fds)) return errno = EINVAL, -1;
  uint8_t head[LMG_FRAME_HEAD] = {tag, (uint8_t)len, (uint8_t)(len >> 8), (uint8_t)(len >> 16), (uint8_t)(len >> 24)};
  struct iovec iov[2] = {{head, LMG_FRAME_HEAD}, {(void *)body, len}};
  union {
    char buf[CMSG_SPACE(sizeof(int) * LMG_MAX_FDS)];
    struct cmsghdr align;
  } u;
  struct msghdr m = {0};
  m.msg_iov = iov;
  m.msg_iovlen = len ? 2 : 1;
  if (nfds) {
    m.msg_control = u.buf;
    m.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *c = CMSG_FIRSTHDR(&m);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
  }
  size_t left = LMG_FRAME_HEAD + len;
  while (left > 0) {
    ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { /* a non-blocking socket (Node's): wait until it drains */
      int e = wait_ready(fd, POLLOUT, -1, -1);
      if (e) return errno = e, -1;
      continue;
    }
    if (w <= 0) return -1;
    left -= (size_t)w;
    m.msg_control = NULL, m.msg_controllen = 0; /* the descriptors went with the first bytes */
    while (m.msg_iovlen && (size_t)w >= m.msg_iov[0].iov_len) w -= (ssize_t)m.msg_iov[0].iov_len, m.msg_iov++, m.msg_iovlen--;
    if (m.msg_iovlen) m.msg_iov[0].iov_base = (uint8_t *)m.msg_iov[0].iov_base + w, m.msg_iov[0].iov_len -= (size_t)w;
  }
  return 0;
}

static int reply(int fd, uint8_t tag, const char *why) { return lmg_message_write(fd, tag, why, why ? strlen(why) : 0, NULL, 0); }

/* Descriptors that came with a read go to the message, up to its room; the rest are closed. */
static void keep_fds(struct msghdr *h, struct lmg_message *m) {
  for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c; c = CMSG_NXTHDR(h, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int in;
      memcpy(&in, CMSG_DATA(c) + i * sizeof(int), sizeof in);
      if (m->nfds < LMG_MAX_FDS) m->fds[m->nfds++] = in;
      else close(in);
    }
  }
}

/* n bytes into p; 0 or an errno (ECONNRESET: the stream ended). */
static int read_exact(int fd, uint8_t *p, size_t n, double deadline, int wake_fd, struct lmg_message *m) {
  while (n > 0) {
    if (deadline >= 0 && now_ms() >= deadline) return ETIMEDOUT; /* also while bytes keep coming */
    union {
      char buf[CMSG_SPACE(sizeof(int) * LMG_MAX_FDS)];
      struct cmsghdr align;
    } u;
    struct iovec iov = {p, n};
    struct msghdr h = {0};
    h.msg_iov = &iov;
    h.msg_iovlen = 1;
    h.msg_control = u.buf;
    h.msg_controllen = sizeof u.buf;
    ssize_t got = recvmsg(fd, &h, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      int e = wait_ready(fd, POLLIN, deadline, wake_fd);
      if (e) return e;
      continue;
    }
    if (got < 0) return errno;
    keep_fds(&h, m);
    if (got == 0) return ECONNRESET;
    p += got;
    n -= (size_t)got;
  }
  return 0;
}

void lmg_message_free(struct lmg_message *m) {
  if (!m) return;
  free(m->body);
  m->body = NULL;
  for (size_t i = 0; i < m->nfds; i++) close(m->fds[i]);
  m->nfds = 0;
}

int lmg_message_read(int fd, struct lmg_message *m, int timeout_ms, int wake_fd) {
  double deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
  uint8_t head[LMG_FRAME_HEAD];
  m->tag = 0, m->body = NULL, m->len = 0, m->nfds = 0;
  int e = read_exact(fd, head, LMG_FRAME_HEAD, deadline, wake_fd, m);
  if (!e) {
    m->tag = head[0];
    m->len = head[1] | (size_t)head[2] << 8 | (size_t)head[3] << 16 | (size_t)head[4] << 24;
    if (m->len > LMG_MAX_BODY) e = EPROTO;
    else if (!(m->body = malloc(m->len + 1))) e = ENOMEM;
    else {
      m->body[m->len] = 0;
      e = read_exact(fd, m->body, m->len, deadline, wake_fd, m);
    }
  }
  if (e) {
    size_t announced = m->len; /* what a too-long message claimed, for the caller's reason */
    lmg_message_free(m);
    m->len = announced;
    return errno = e, -1;
  }
  return 0;
}

/* ---- sockets ------------------------------------------------------------------------ */

#define SUN_PATH_MAX sizeof(((struct sockaddr_un *)0)->sun_path)

static socklen_t unix_address(const char *path, struct sockaddr_un *a) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof a->sun_path) return 0;
  memcpy(a->sun_path, path, n);
  if (path[0] == '@') a->sun_path[0] = '\0'; /* the abstract namespace */
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '@' ? 0 : 1));
}

/* The socket file a listener made: removed when it stops only while it is still that one (a later start may own the path). */
struct bound_path {
  char path[SUN_PATH_MAX];
  dev_t dev;
  ino_t ino;
};

static void unlink_bound(const struct bound_path *b) {
  struct stat st;
  if (b->path[0] && lstat(b->path, &st) == 0 && st.st_dev == b->dev && st.st_ino == b->ino) unlink(b->path);
}

static int listen_at(const char *path, struct bound_path *bound, char *err, size_t errlen) {
  struct sockaddr_un a;
  socklen_t alen = unix_address(path, &a);
  if (!alen) return fail(err, errlen, EINVAL, "socket path must be 1..%zu characters", sizeof a.sun_path - 1);
  /* non-blocking: a connection that goes away between poll and accept4 must not hold the thread */
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return fail(err, errlen, errno, "socket: %s", strerror(errno));
  if (path[0] != '@') {
    struct stat stale;
    if (lstat(path, &stale) == 0 && S_ISSOCK(stale.st_mode)) unlink(path); /* a stale socket of an earlier run */
  }
  memset(bound, 0, sizeof *bound);
  struct stat st;
  int ok = bind(fd, (struct sockaddr *)&a, alen) == 0;
  if (ok && path[0] != '@') {
    ok = lstat(path, &st) == 0;
    if (ok) {
      snprintf(bound->path, sizeof bound->path, "%s", path);
      bound->dev = st.st_dev;
      bound->ino = st.st_ino;
    }
    /* only this user may connect to a path socket (connecting needs write permission on it); chmod, not umask, which is
     * the whole process's while other threads of the VMM run; whoever connects before it is turned away by peer_allowed */
    ok = ok && chmod(path, 0600) == 0;
  }
  if (!ok || listen(fd, 4) != 0) {
    int e = errno;
    close(fd);
    unlink_bound(bound);
    return fail(err, errlen, e, "listening on %s: %s", path, strerror(e));
  }
  return fd;
}

/* Whoever connects may read the guest's memory: root and this process's own user only. */
static int peer_allowed(int fd) {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return 0;
  return cred.uid == 0 || cred.uid == getuid();
}

/*
 * The next connection from root or this user (strangers are turned away) within timeout_ms
 * (< 0: no limit); or -1 with errno ETIMEDOUT, ECANCELED (wake_fd, unless -1, became
 * readable), or accept4's for a failure that persists (out of descriptors).
 */
static int accept_peer(int lfd, int timeout_ms, int wake_fd) {
  double deadline = timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
  for (;;) {
    int e = wait_ready(lfd, POLLIN, deadline, wake_fd);
    if (e) return errno = e, -1;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    if (fd >= 0 && peer_allowed(fd)) return fd;
    if (fd >= 0) close(fd);
    else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) return -1;
  }
}

/* Every refusal is answered: livemig reports the reason instead of a closed socket. */
static int refuse(int fd, const char *fmt, ...) {
  char why[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  return reply(fd, LMG_TAG_ERROR, why);
}

/* A message that could not be read is answered too; the stream is lost after it, and the caller drops the connection. */
static void refuse_unreadable(int fd, int e, size_t announced) {
  if (e == EPROTO) refuse(fd, "a message of %zu bytes, more than the contract's %u", announced, LMG_MAX_BODY);
  else if (e == ENOMEM) refuse(fd, "no memory for a message of %zu bytes", announced);
}

/* 'V' + u32 LE: the contract version livemig speaks from now on; only before any other request. */
static int answer_contract(int fd, const struct lmg_message *m, int still_open, int oldest, int *agreed) {
  uint32_t v = m->len == 4 ? (uint32_t)le(m->body, 4) : 0;
  if (!still_open) return refuse(fd, "the contract is agreed first, before any other request");
  if (m->len != 4) return refuse(fd, "a contract version is a u32, not %zu bytes", m->len);
  if (v < (uint32_t)oldest || v > LMG_CONTRACT) return refuse(fd, "contract %u is outside this hello's %d..%d", v, oldest, LMG_CONTRACT);
  if (agreed) *agreed = (int)v;
  return reply(fd, LMG_TAG_CONTRACT_AGREED, NULL);
}

/*
 * The caller's ops struct, as large as it was built (its first field says): one shorter than
 * the first sized layout is refused, and in a longer one every byte past what this library
 * knows must be zero (a callback it would never call must not be set).
 */
static int take_ops(void *ours, size_t ours_size, size_t first_size, const void *theirs, const char *what, char *err, size_t errlen) {
  size_t size;
  memcpy(&size, theirs, sizeof size);
  if (size < first_size) return fail(err, errlen, EINVAL, "%s.size is %zu: set it to sizeof(struct %s)", what, size, what);
  for (size_t i = ours_size; i < size; i++) {
    if (((const uint8_t *)theirs)[i])
      return fail(err, errlen, E2BIG, "%s sets fields past the %zu bytes this library (contract %d) knows", what, ours_size, LMG_CONTRACT);
  }
  memset(ours, 0, ours_size);
  memcpy(ours, theirs, size < ours_size ? size : ours_size);
  return 0;
}

int lmg_version(int *oldest) {
  if (oldest) *oldest = LMG_CONTRACT_OLDEST;
  return LMG_CONTRACT;
}

/* ---- userfaultfd -------------------------------------------------------------------- */

static int open_uffd(void) {
  int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
  if (fd < 0 && errno == EPERM) fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
  return fd;
}

static int uffd_with(uint64_t features, char *err, size_t errlen) {
  int fd = open_uffd();
  if (fd < 0) return fail(err, errlen, errno, "userfaultfd: %s", strerror(errno));
  struct uffdio_api api = {.api = UFFD_API, .features = features};
  if (ioctl(fd, UFFDIO_API, &api) != 0) {
    int e = errno;
    close(fd);
    return fail(err, errlen, e, "UFFDIO_API (features 0x%llx): %s", (unsigned long long)features, strerror(e));
  }
  return fd;
}

int lmg_track(struct lmg_region *regions, size_t n, int *uffd, char *err, size_t errlen) {
  /* UFFDIO_API with no feature asked reports what the kernel offers; a descriptor takes one API call */
  int probe = open_uffd();
  struct uffdio_api api = {.api = UFFD_API, .features = 0};
  if (probe < 0 || ioctl(probe, UFFDIO_API, &api) != 0) {
    int e = errno;
    if (probe >= 0) close(probe);
    return fail(err, errlen, e, "probing userfaultfd: %s", strerror(e));
  }
  close(probe);
  if (!(api.features & UFFD_FEATURE_WP_ASYNC)) return fail(err, errlen, ENOTSUP, "userfaultfd lacks UFFD_FEATURE_WP_ASYNC (Linux >= 6.7 needed)");
  uint64_t want = UFFD_FEATURE_WP_ASYNC | (api.features & (UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
  int fd = uffd_with(want, err, errlen);
  if (fd < 0) return -1;
  for (size_t i = 0; i < n; i++) {
    struct uffdio_register reg = {.range = {(uint64_t)(uintptr_t)regions[i].addr, regions[i].size}, .mode = UFFDIO_REGISTER_MODE_WP};
    struct uffdio_writeprotect wp = {.range = reg.range, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0 || ioctl(fd, UFFDIO_WRITEPROTECT, &wp) != 0) {
      int e = errno;
      close(fd);
      return fail(err, errlen, e, "write-protecting region %s: %s", regions[i].name, strerror(e));
    }
  }
  for (size_t i = 0; i < n; i++) regions[i].tracked = 1;
  *uffd = fd;
  return 0;
}

/* ---- source ------------------------------------------------------------------------- */

/* how long the serving thread waits before dialling its daemon again, or accepting again after running out of descriptors */
#define RETRY_MS 500

/* the ops as first published with a size (contract 3): every caller has at least these */
#define SOURCE_OPS_FIRST_SIZE (offsetof(struct lmg_source_ops, thread_start) + sizeof(void (*)(void *)))

struct lmg_source {
  /* fixed before the serving thread starts */
  char name[LMG_NAME_MAX];
  struct lmg_region regions[LMG_MAX_REGIONS];
  size_t n;
  struct lmg_disk disks[LMG_MAX_DISKS];
  size_t nd;
  struct lmg_source_ops ops;
  char *hello;
  size_t hello_len;
  int lfd; /* -1 when registered with a daemon */
  struct bound_path bound;
  char dial[SUN_PATH_MAX]; /* registered: the daemon's guest socket */
  int wake[2];             /* lmg_source_stop writes wake[1]; every wait of the serving thread also polls wake[0] */
  pthread_t thread;
  /* the connection served now (-1: none), which stop shuts down: a reply livemig never reads must not hold the thread */
  pthread_mutex_t lock;
  int conn;
  /* the serving thread's alone until stop has joined it; a pause outlives a connection (after 'C' only livemig may end it) */
  int paused, committed, self_resumed, released;
  uint32_t lease_ms;
};

/* what serving one connection came to */
enum served { SERVED_GONE, SERVED_RELEASED, SERVED_STOPPED };

/* Starts at the oldest contract, which a livemig that knows no negotiation takes; livemig may raise it with 'V'. */
static char *source_hello(const struct lmg_source *s, size_t *len) {
  size_t cap = 512 + s->n * 320 + s->nd * 200, at = 0;
  char *h = malloc(cap);
  if (!h) return NULL;
  /* disks exist from contract 4 on: an older livemig refuses such a hello, naming the versions */
  at += (size_t)snprintf(h + at, cap - at, "{\"contract\":%d,\"contractMax\":%d,\"role\":\"source\",\"pid\":%d,\"name\":\"%s\",\"regions\":[",
                         s->nd ? LMG_CONTRACT_DISKS : LMG_CONTRACT_OLDEST, LMG_CONTRACT, (int)getpid(), s->name);
  for (size_t i = 0; i < s->n; i++) {
    const struct lmg_region *r = &s->regions[i];
    at += (size_t)snprintf(h + at, cap - at,
                           "%s{\"id\":%u,\"name\":\"%s\",\"size\":%llu,\"pageSize\":%u,\"address\":\"%llu\",\"offset\":%llu,\"tracking\":\"%s\"}", i ? "," : "",
                           r->id, r->name, (unsigned long long)r->size, PAGE, (unsigned long long)(uintptr_t)r->addr, (unsigned long long)r->offset,
                           r->tracked ? "uffd-wp-async" : "none");
  }
  at += (size_t)snprintf(h + at, cap - at, "]");
  if (s->nd) {
    at += (size_t)snprintf(h + at, cap - at, ",\"disks\":[");
    for (size_t i = 0; i < s->nd; i++) {
      const struct lmg_disk *d = &s->disks[i];
      at += (size_t)snprintf(h + at, cap - at, "%s{\"name\":\"%s\",\"size\":%llu,\"blockSize\":%u,\"tracking\":\"%s\"}", i ? "," : "", d->name,
                             (unsigned long long)d->size, LMG_DISK_BLOCK, d->written ? "reported" : "none");
    }
    at += (size_t)snprintf(h + at, cap - at, "]");
  }
  snprintf(h + at, cap - at, "}");
  *len = strlen(h);
  return h;
}

/* 1 once lmg_source_stop was called, waiting up to ms for it */
static int stop_within(const struct lmg_source *s, int ms) { return wait_ready(s->wake[0], POLLIN, now_ms() + ms, -1) == 0; }

static void self_resume(struct lmg_source *s) {
  s->paused = 0;
  s->self_resumed = 1;
  s->ops.resume(s->ops.ctx);
}

/* 'P' [+ u32 LE lease ms] -> 'p' + the device state. */
static int answer_pause(struct lmg_source *s, int fd, const struct lmg_message *m) {
  if (m->len != 0 && m->len != 4) return refuse(fd, "a pause carries nothing or a u32 lease, not %zu bytes", m->len);
  if (s->paused && s->committed) return refuse(fd, "paused after livemig's commitment: only a resume or a release ends it");
  char why[512] = "";
  uint8_t *state = NULL;
  size_t len = 0;
  if (s->ops.pause(s->ops.ctx, &state, &len, why, sizeof why) != 0) {
    free(state);
    return refuse(fd, "%s", why[0] ? why : "the guest refused to pause");
  }
  if (len > LMG_MAX_BODY || (len && !state)) {
    /* a pause that cannot be answered must not leave the guest stopped */
    free(state);
    s->ops.resume(s->ops.ctx);
    if (len > LMG_MAX_BODY) return refuse(fd, "the guest's device state is %zu bytes, more than the contract's %u", len, LMG_MAX_BODY);
    return refuse(fd, "the guest said its device state is %zu bytes but returned none", len);
  }
  s->paused = 1, s->committed = 0, s->self_resumed = 0;
  s->lease_ms = m->len == 4 ? (uint32_t)le(m->body, 4) : 0;
  int sent = lmg_message_write(fd, LMG_TAG_PAUSED, state, len, NULL, 0);
  free(state);
  if (sent == 0 && s->ops.paused) {
    /* livemig, woken by 'p' on this CPU, goes on with the hand-over before this does more */
    sched_yield();
    s->ops.paused(s->ops.ctx);
  }
  return sent;
}

/* One livemig connection, from the hello until it ends, the guest is released, or stop. */
static enum served serve_connection(struct lmg_source *s, int fd) {
  /* a memfd per region, an image per disk, then a bitmap per tracked disk */
  int fds[LMG_MAX_FDS];
  size_t nfds = 0;
  for (size_t i = 0; i < s->n; i++) fds[nfds++] = s->regions[i].fd;
  for (size_t i = 0; i < s->nd; i++) fds[nfds++] = s->disks[i].fd;
  for (size_t i = 0; i < s->nd; i++) {
    if (s->disks[i].written) fds[nfds++] = s->disks[i].written_fd;
  }
  if (lmg_message_write(fd, LMG_TAG_HELLO, s->hello, s->hello_len, fds, nfds) != 0) return SERVED_GONE;
  for (int contract_open = 1;;) {
    const int leased = s->paused && !s->committed && s->lease_ms > 0;
    int timeout_ms = !leased ? -1 : s->lease_ms > INT_MAX ? INT_MAX : (int)s->lease_ms;
    struct lmg_message m;
    if (lmg_message_read(fd, &m, timeout_ms, s->wake[0]) != 0) {
      int e = errno;
      if (e == ETIMEDOUT && leased) {
        /* livemig is stalled before its point of commitment: the destination cannot run the guest */
        self_resume(s);
        continue;
      }
      refuse_unreadable(fd, e, m.len);
      if (s->paused && !s->committed) self_resume(s); /* livemig went away (or the guest stops serving) before committing */
      return e == ECANCELED ? SERVED_STOPPED : SERVED_GONE;
    }
    int answered;
    switch (m.tag) {
      case LMG_TAG_CONTRACT: answered = answer_contract(fd, &m, contract_open, s->nd ? LMG_CONTRACT_DISKS : LMG_CONTRACT_OLDEST, NULL); break;
      case LMG_TAG_PAUSE: answered = answer_pause(s, fd, &m); break;
      case LMG_TAG_COMMIT:
        if (!s->paused) {
          answered = refuse(fd, s->self_resumed ? "not paused: the guest resumed itself when its lease ran out" : "not paused: a commit follows a pause");
        } else {
          s->committed = 1;
          answered = reply(fd, LMG_TAG_COMMITTED, NULL);
        }
        break;
      case LMG_TAG_RESUME:
        if (s->paused) s->ops.resume(s->ops.ctx);
        s->paused = 0, s->committed = 0, s->self_resumed = 0;
        answered = reply(fd, LMG_TAG_RESUMED, NULL);
        break;
      case LMG_TAG_THROTTLE:
        if (m.len != 1 || m.body[0] > 99) answered = refuse(fd, "throttle takes one byte, a percent in 0..99");
        else if (!s->ops.throttle) answered = refuse(fd, "this guest cannot be throttled");
        else if (s->ops.throttle(s->ops.ctx, m.body[0]) != 0) answered = refuse(fd, "the guest refused the throttle");
        else answered = reply(fd, LMG_TAG_THROTTLED, NULL);
        break;
      case LMG_TAG_RELEASE:
        if (!s->paused || !s->committed) {
          answered = refuse(fd, "release before a committed pause: the guest would be lost");
          break;
        }
        (void)reply(fd, LMG_TAG_RELEASED, NULL); /* committed: the guest runs at the destination whether or not livemig hears this */
        lmg_message_free(&m);
        s->released = 1;
        s->ops.released(s->ops.ctx);
        return SERVED_RELEASED;
      default: answered = refuse(fd, "unknown request 0x%02x", m.tag);
    }
    if (m.tag != LMG_TAG_CONTRACT) contract_open = 0;
    lmg_message_free(&m);
    if (answered != 0) {
      if (s->paused && !s->committed) self_resume(s);
      return SERVED_GONE;
    }
  }
}

/* The next livemig to connect, or -1 once stop was called. */
static int accept_livemig(struct lmg_source *s) {
  for (;;) {
    int fd = accept_peer(s->lfd, -1, s->wake[0]);
    if (fd >= 0 || errno == ECANCELED) return fd;
    /* out of descriptors or memory for now: the guest serves again once there are some */
    if (stop_within(s, RETRY_MS)) return -1;
  }
}

/*
 * A connection to the daemon once one answers, or -1 once stop was called: a daemon that
 * restarts finds its guests again. Only root or this user may be the daemon, as only they may
 * connect to a guest that listens.
 */
static int dial_daemon(struct lmg_source *s) {
  struct sockaddr_un a;
  socklen_t alen = unix_address(s->dial, &a);
  for (;;) {
    /* non-blocking: a daemon whose backlog is full answers EAGAIN instead of holding up a stop */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, alen) == 0 && peer_allowed(fd)) return fd;
    if (fd >= 0) close(fd);
    if (stop_within(s, RETRY_MS)) return -1;
  }
}

/* Serves one livemig after another until the guest is released or stop is called. */
static void *source_thread(void *arg) {
  struct lmg_source *s = arg;
  if (s->ops.thread_start) s->ops.thread_start(s->ops.ctx);
  for (int first = 1;; first = 0) {
    /* the daemon let the guest go (or went away): dial again, but not in a tight loop */
    if (s->dial[0] && !first && stop_within(s, RETRY_MS)) break;
    int fd = s->dial[0] ? dial_daemon(s) : accept_livemig(s);
    if (fd < 0) break;
    pthread_mutex_lock(&s->lock);
    s->conn = fd;
    pthread_mutex_unlock(&s->lock);
    enum served how = serve_connection(s, fd);
    pthread_mutex_lock(&s->lock);
    s->conn = -1;
    pthread_mutex_unlock(&s->lock);
    close(fd);
    if (how != SERVED_GONE) break;
  }
  return NULL;
}

static void source_free(struct lmg_source *s) {
  if (s->lfd >= 0) close(s->lfd);
  unlink_bound(&s->bound);
  for (int i = 0; i < 2; i++) {
    if (s->wake[i] >= 0) close(s->wake[i]);
  }
  pthread_mutex_destroy(&s->lock);
  free(s->hello);
  free(s);
}

static struct lmg_source *source_start(const char *listen_path, const char *dial_path, const char *name, const struct lmg_region *regions, size_t n,
                                       const struct lmg_disk *disks, size_t nd, const struct lmg_source_ops *ops, char *err, size_t errlen) {
  if (n == 0 || n > LMG_MAX_REGIONS) return fail(err, errlen, EINVAL, "a guest hands over 1..%d regions, not %zu", LMG_MAX_REGIONS, n), NULL;
  if (nd > LMG_MAX_DISKS || (nd && !disks)) return fail(err, errlen, EINVAL, "a guest hands over 0..%d disks, not %zu", LMG_MAX_DISKS, nd), NULL;
  for (size_t i = 0; i < nd; i++) {
    const struct lmg_disk *d = &disks[i];
    if (!valid_name(d->name)) return fail(err, errlen, EINVAL, "disk %zu: a name is 1..63 characters of [A-Za-z0-9._-]", i), NULL;
    if (!d->size || d->size % LMG_DISK_BLOCK)
      return fail(err, errlen, EINVAL, "disk %s: the size must be a positive multiple of %u", d->name, LMG_DISK_BLOCK), NULL;
    if (d->fd < 0) return fail(err, errlen, EBADF, "disk %s: no file descriptor", d->name), NULL;
    for (size_t j = 0; j < i; j++) {
      if (!strcmp(disks[j].name, d->name)) return fail(err, errlen, EINVAL, "the disk name %s is used twice", d->name), NULL;
    }
  }
  if (!regions || !ops) return fail(err, errlen, EINVAL, "regions and ops are required"), NULL;
  struct lmg_source_ops taken;
  if (take_ops(&taken, sizeof taken, SOURCE_OPS_FIRST_SIZE, ops, "lmg_source_ops", err, errlen) != 0) return NULL;
  if (!taken.pause || !taken.resume || !taken.released) return fail(err, errlen, EINVAL, "pause, resume and released are required"), NULL;
  if (name && !valid_name(name)) return fail(err, errlen, EINVAL, "the guest's name must be 1..63 characters of [A-Za-z0-9._-]"), NULL;
  for (size_t i = 0; i < n; i++) {
    const struct lmg_region *r = &regions[i];
    if (!valid_name(r->name)) return fail(err, errlen, EINVAL, "region %zu: a name is 1..63 characters of [A-Za-z0-9._-]", i), NULL;
    if (!r->size || r->size % PAGE || r->offset % PAGE || (uintptr_t)r->addr % PAGE)
      return fail(err, errlen, EINVAL, "region %s: address, size and offset must be page-aligned and the size positive", r->name), NULL;
    if (r->fd < 0) return fail(err, errlen, EBADF, "region %s: no file descriptor", r->name), NULL;
    for (size_t j = 0; j < i; j++) {
      if (regions[j].id == r->id) return fail(err, errlen, EINVAL, "region id %u is used twice", r->id), NULL;
    }
  }
  struct sockaddr_un a;
  if (dial_path && !unix_address(dial_path, &a)) return fail(err, errlen, EINVAL, "socket path must be 1..%zu characters", sizeof a.sun_path - 1), NULL;
  struct lmg_source *s = calloc(1, sizeof *s);
  if (!s) return fail(err, errlen, ENOMEM, "out of memory"), NULL;
  s->lfd = -1, s->conn = -1, s->wake[0] = -1, s->wake[1] = -1;
  pthread_mutex_init(&s->lock, NULL);
  snprintf(s->name, sizeof s->name, "%s", name ? name : "guest");
  memcpy(s->regions, regions, n * sizeof *regions);
  s->n = n;
  if (nd) memcpy(s->disks, disks, nd * sizeof *disks);
  s->nd = nd;
  s->ops = taken;
  /* built now, so that no connection is ever answered without it */
  s->hello = source_hello(s, &s->hello_len);
  if (!s->hello) return source_free(s), fail(err, errlen, ENOMEM, "out of memory"), NULL;
  if (pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    int e = errno;
    return source_free(s), fail(err, errlen, e, "pipe2: %s", strerror(e)), NULL;
  }
  if (dial_path) snprintf(s->dial, sizeof s->dial, "%s", dial_path);
  else if ((s->lfd = listen_at(listen_path, &s->bound, err, errlen)) < 0) return source_free(s), NULL;
  int e = pthread_create(&s->thread, NULL, source_thread, s);
  if (e != 0) return source_free(s), fail(err, errlen, e, "starting the library's thread: %s", strerror(e)), NULL;
  return s;
}

struct lmg_source *lmg_source_start(const char *path, const char *name, const struct lmg_region *regions, size_t n, const struct lmg_source_ops *ops, char *err,
                                    size_t errlen) {
  return lmg_source_start_disks(path, name, regions, n, NULL, 0, ops, err, errlen);
}

struct lmg_source *lmg_source_start_disks(const char *path, const char *name, const struct lmg_region *regions, size_t n, const struct lmg_disk *disks,
                                          size_t ndisks, const struct lmg_source_ops *ops, char *err, size_t errlen) {
  if (!path) return fail(err, errlen, EINVAL, "a socket path is required"), NULL;
  return source_start(path, NULL, name, regions, n, disks, ndisks, ops, err, errlen);
}

struct lmg_source *lmg_source_register(const char *daemon_path, const char *name, const struct lmg_region *regions, size_t n, const struct lmg_source_ops *ops,
                                       char *err, size_t errlen) {
  return lmg_source_register_disks(daemon_path, name, regions, n, NULL, 0, ops, err, errlen);
}

struct lmg_source *lmg_source_register_disks(const char *daemon_path, const char *name, const struct lmg_region *regions, size_t n,
                                             const struct lmg_disk *disks, size_t ndisks, const struct lmg_source_ops *ops, char *err, size_t errlen) {
  if (!daemon_path || !name) return fail(err, errlen, EINVAL, "the daemon's path and the guest's name are required"), NULL;
  return source_start(NULL, daemon_path, name, regions, n, disks, ndisks, ops, err, errlen);
}

/* ---- disks -------------------------------------------------------------------------- */

static size_t bitmap_bytes(uint64_t size) {
  uint64_t blocks = (size + LMG_DISK_BLOCK - 1) / LMG_DISK_BLOCK;
  return (size_t)((blocks + 63) / 64 * 8);
}

int lmg_disk_track(struct lmg_disk *d, char *err, size_t errlen) {
  if (!d || !d->size || d->size % LMG_DISK_BLOCK) return fail(err, errlen, EINVAL, "a disk's size must be a positive multiple of %u", LMG_DISK_BLOCK);
  if (d->written) return 0;
  size_t bytes = bitmap_bytes(d->size);
  int fd = memfd_create("livemig-written-blocks", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return fail(err, errlen, errno, "memfd_create: %s", strerror(errno));
  /* sealed at its size: livemig maps it too, and takes no bitmap a truncation could fault under it */
  if (ftruncate(fd, (off_t)bytes) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    int e = errno;
    close(fd);
    return fail(err, errlen, e, "sizing the written-block bitmap: %s", strerror(e));
  }
  void *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (a == MAP_FAILED) {
    int e = errno;
    close(fd);
    return fail(err, errlen, e, "mapping the written-block bitmap: %s", strerror(e));
  }
  d->written = a;
  d->written_fd = fd;
  return 0;
}

void lmg_disk_written(const struct lmg_disk *d, uint64_t offset, uint64_t length) {
  if (!d->written || !length || offset >= d->size) return;
  uint64_t first = offset / LMG_DISK_BLOCK, last = (offset + length - 1 < d->size ? offset + length - 1 : d->size - 1) / LMG_DISK_BLOCK;
  for (uint64_t b = first; b <= last;) {
    uint64_t word = b / 64, bit = b % 64, upto = last - b + 1 < 64 - bit ? last - b + 1 : 64 - bit;
    uint64_t mask = (upto == 64 ? ~0ULL : ((1ULL << upto) - 1)) << bit;
    /* livemig takes the word with an atomic exchange: a bit set here is in this round or the next */
    __atomic_fetch_or(&d->written[word], mask, __ATOMIC_RELEASE);
    b += upto;
  }
}

void lmg_disk_untrack(struct lmg_disk *d) {
  if (!d || !d->written) return;
  munmap(d->written, bitmap_bytes(d->size));
  close(d->written_fd);
  d->written = NULL;
  d->written_fd = -1;
}

int lmg_source_stop(struct lmg_source *s) {
  if (!s) return errno = EINVAL, -1;
  /* a callback runs on the serving thread, which this joins */
  if (pthread_equal(pthread_self(), s->thread)) return errno = EDEADLK, -1;
  ssize_t w;
  do w = write(s->wake[1], "", 1);
  while (w < 0 && errno == EINTR);
  pthread_mutex_lock(&s->lock);
  if (s->conn >= 0) shutdown(s->conn, SHUT_RDWR);
  pthread_mutex_unlock(&s->lock);
  pthread_join(s->thread, NULL);
  int how = s->released ? LMG_STOPPED_RELEASED : s->paused && s->committed ? LMG_STOPPED_COMMITTED : LMG_STOPPED;
  source_free(s);
  return how;
}

/* ---- destination -------------------------------------------------------------------- */

/* the ops as first published with a size (contract 3): every caller has at least these */
#define INCOMING_OPS_FIRST_SIZE (offsetof(struct lmg_incoming_ops, all_present) + sizeof(void (*)(void *)))

/* where the guest is: the thread that serves livemig after run waits for RUNNING (or CLOSING) */
enum incoming_phase { BEFORE_RUN, RUNNING, CLOSING };

struct lmg_incoming {
  int fd;
  int contract; /* the version livemig agreed to speak ('V'); the hello's oldest until then */
  struct lmg_region regions[LMG_MAX_REGIONS];
  size_t n;
  struct lmg_disk disks[LMG_MAX_DISKS];
  size_t nd;
  struct lmg_incoming_ops ops;
  int waited;
  /* post-copy's userfaultfd: opened by lmg_incoming_wait's thread before run, closed by the after-run thread on 'A' */
  int uffd;
  /* lmg_incoming_postcopy's answer, which any thread may ask while the after-run thread changes it */
  atomic_int pages_arriving;
  /* started (waiting) before the regions are answered, so that a failure to start it is answered before anything depends on it */
  pthread_t thread;
  int thread_started;
  pthread_mutex_t lock;
  pthread_cond_t changed;
  enum incoming_phase phase; /* under lock */
  /* disk post-copy: the socket the VMM asks for blocks on (lmg_disk_fetch), given with 'U' */
  int asks;
  pthread_mutex_t ask_lock;
  pthread_cond_t ask_answered;
  struct ask_waiter *waiters; /* under ask_lock */
  uint64_t next_tag;          /* under ask_lock */
  int ask_reader;             /* under ask_lock: a waiter is reading answers for everyone */
  atomic_int livemig_gone;    /* the after-run thread ended: nothing more comes */
};

/* an ask in flight: its caller sleeps until the answer with its tag comes */
struct ask_waiter {
  uint64_t tag;
  int done, error;
  struct ask_waiter *next;
};

static void unmap_all(struct lmg_incoming *h) {
  for (size_t i = 0; i < h->n; i++) {
    if (h->regions[i].addr) munmap(h->regions[i].addr, h->regions[i].size);
    if (h->regions[i].fd >= 0) close(h->regions[i].fd);
  }
  h->n = 0;
  for (size_t i = 0; i < h->nd; i++) {
    lmg_disk_untrack(&h->disks[i]);
    if (h->disks[i].fd >= 0) close(h->disks[i].fd);
  }
  h->nd = 0;
}

/* Maps the pages of r's file that hold data (SEEK_DATA/SEEK_HOLE), and only those. */
static void populate_data(const struct lmg_region *r) {
  off_t end = (off_t)(r->offset + r->size);
  for (off_t at = (off_t)r->offset; at < end;) {
    off_t data = lseek(r->fd, at, SEEK_DATA);
    if (data < 0 || data >= end) return; /* ENXIO: nothing more; another error: leave the rest to faults */
    off_t hole = lseek(r->fd, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    (void)madvise((uint8_t *)r->addr + (data - (off_t)r->offset), (size_t)(hole - data), MADV_POPULATE_WRITE);
    at = hole;
  }
}

/*
 * Contract 4's disks after the regions in 'M': u32 count | count x (u64 size | u8 name length |
 * name), an image each after the regions' memfds. Takes them; a reason on failure.
 */
static int take_disks(struct lmg_incoming *h, struct lmg_message *m, const uint8_t **at, size_t first_fd, char *why, size_t whylen) {
  const uint8_t *p = *at, *end = m->body + m->len;
  if (end - p < 4) return snprintf(why, whylen, "the disk table is missing"), -1;
  uint32_t count = (uint32_t)le(p, 4);
  p += 4;
  if (count > LMG_MAX_DISKS || first_fd + count != m->nfds)
    return snprintf(why, whylen, "%u disks with %zu descriptors after the regions' (0..%d, one each)", count, m->nfds - first_fd, LMG_MAX_DISKS), -1;
  for (uint32_t i = 0; i < count; i++) {
    struct lmg_disk *d = &h->disks[i];
    if (end - p < 9) return snprintf(why, whylen, "disk %u: truncated", i), -1;
    d->size = le(p, 8);
    size_t nl = p[8];
    p += 9;
    if (nl == 0 || nl >= LMG_NAME_MAX || (size_t)(end - p) < nl) return snprintf(why, whylen, "disk %u: bad name", i), -1;
    memcpy(d->name, p, nl);
    d->name[nl] = 0;
    p += nl;
    d->fd = m->fds[first_fd + i];
    m->fds[first_fd + i] = -1;
    d->written = NULL;
    d->written_fd = -1;
    h->nd = i + 1;
    struct stat st;
    if (!valid_name(d->name)) return snprintf(why, whylen, "disk %u: a name is 1..63 characters of [A-Za-z0-9._-]", i), -1;
    if (!d->size || d->size % LMG_DISK_BLOCK) return snprintf(why, whylen, "disk %s: size %llu is not whole blocks", d->name, (unsigned long long)d->size), -1;
    if (fstat(d->fd, &st) != 0 || (S_ISREG(st.st_mode) && (uint64_t)st.st_size != d->size) || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)))
      return snprintf(why, whylen, "disk %s: its descriptor is not an image of %llu bytes", d->name, (unsigned long long)d->size), -1;
  }
  *at = p;
  return 0;
}

/*
 * 'M': u8 flags (bit 0: populate) | u32 count | count x (u32 id | u64 size | u64 offset |
 * u8 name length | name), one memfd per region with it; from contract 4 the disk table
 * follows (take_disks). Maps them; a reason on failure.
 */
static int take_regions(struct lmg_incoming *h, struct lmg_message *m, char *why, size_t whylen) {
  const uint8_t *p = m->body, *end = m->body + m->len;
  if (m->len < 5) return snprintf(why, whylen, "regions message of %zu bytes", m->len), -1;
  int populate = p[0] & 1;
  uint32_t count = (uint32_t)le(p + 1, 4);
  p += 5;
  int with_disks = h->contract >= LMG_CONTRACT_DISKS;
  if (count == 0 || count > LMG_MAX_REGIONS || count > m->nfds || (!with_disks && count != m->nfds))
    return snprintf(why, whylen, "%u regions with %zu descriptors (1..%d, one each)", count, m->nfds, LMG_MAX_REGIONS), -1;
  for (uint32_t i = 0; i < count; i++) {
    struct lmg_region *r = &h->regions[i];
    if (end - p < 21) return snprintf(why, whylen, "region %u: truncated", i), -1;
    r->id = (uint32_t)le(p, 4), r->size = le(p + 4, 8), r->offset = le(p + 12, 8);
    size_t nl = p[20];
    p += 21;
    if (nl == 0 || nl >= LMG_NAME_MAX || (size_t)(end - p) < nl) return snprintf(why, whylen, "region %u: bad name", i), -1;
    memcpy(r->name, p, nl);
    r->name[nl] = 0;
    p += nl;
    if (!valid_name(r->name)) return snprintf(why, whylen, "region %u: a name is 1..63 characters of [A-Za-z0-9._-]", i), -1;
    r->fd = m->fds[i];
    m->fds[i] = -1;
    r->addr = NULL;
    h->n = i + 1;
    struct stat st;
    if (!r->size || r->size % PAGE || r->offset % PAGE) return snprintf(why, whylen, "region %s: unaligned", r->name), -1;
    if (r->offset > UINT64_MAX - r->size || r->size > SIZE_MAX || r->offset > (uint64_t)INT64_MAX)
      return snprintf(why, whylen, "region %s: offset + size out of range", r->name), -1;
    if (fstat(r->fd, &st) != 0 || (uint64_t)st.st_size < r->offset + r->size)
      return snprintf(why, whylen, "region %s: its memfd is smaller than offset + size", r->name), -1;
    void *a = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, (off_t)r->offset);
    if (a == MAP_FAILED) return snprintf(why, whylen, "region %s: mmap: %s", r->name, strerror(errno)), -1;
    r->addr = a;
  }
  if (with_disks && take_disks(h, m, &p, count, why, whylen) != 0) return -1;
  if (p != end) return snprintf(why, whylen, "%zu bytes after the region table", (size_t)(end - p)), -1;
  m->nfds = 0;
  if (populate) {
    /* every page livemig allocated mapped now, while pre-copy runs, so the guest runs at memory
       speed at once; a hole stays one (populating it would allocate what the guest never wrote) */
    for (size_t i = 0; i < h->n; i++) populate_data(&h->regions[i]);
  }
  return 0;
}

/* 'K': the socket lmg_disk_fetch and lmg_disk_overwrite ask on (post-copy with disks). */
static int take_disk_asks(struct lmg_incoming *h, struct lmg_message *m) {
  if (m->nfds != 1) return refuse(h->fd, "'K' carries one socket, not %zu descriptors", m->nfds);
  if (h->nd == 0) return refuse(h->fd, "'K' gives an ask socket, but the guest has no disks");
  int type = 0;
  socklen_t len = sizeof type;
  if (getsockopt(m->fds[0], SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_SEQPACKET)
    return refuse(h->fd, "'K' carries a descriptor that is not a SOCK_SEQPACKET socket");
  pthread_mutex_lock(&h->ask_lock);
  if (h->asks >= 0) close(h->asks);
  h->asks = m->fds[0];
  m->nfds = 0;
  pthread_mutex_unlock(&h->ask_lock);
  return reply(h->fd, LMG_TAG_DISK_ASKS_TAKEN, NULL);
}

int lmg_register_minor(const struct lmg_region *regions, size_t n, int *uffd, char *err, size_t errlen) {
  int fd = uffd_with(UFFD_FEATURE_MINOR_SHMEM, err, errlen);
  if (fd < 0) return -1;
  for (size_t i = 0; i < n; i++) {
    const struct lmg_region *r = &regions[i];
    /* the pages stay in the memfd; only this mapping's entries go, so every touch faults */
    struct uffdio_register reg = {.range = {(uint64_t)(uintptr_t)r->addr, r->size}, .mode = UFFDIO_REGISTER_MODE_MINOR};
    if (madvise(r->addr, r->size, MADV_DONTNEED) != 0 || ioctl(fd, UFFDIO_REGISTER, &reg) != 0 || !(reg.ioctls & (1ULL << _UFFDIO_CONTINUE))) {
      int e = errno;
      close(fd);
      return fail(err, errlen, e, "registering region %s for minor faults: %s", r->name, strerror(e));
    }
  }
  *uffd = fd;
  return 0;
}

/* 'U': every region registered for minor faults on one userfaultfd, which goes to livemig. */
static int register_postcopy(struct lmg_incoming *h) {
  char why[256];
  if (h->uffd < 0) {
    int fd;
    if (lmg_register_minor(h->regions, h->n, &fd, why, sizeof why) != 0) return reply(h->fd, LMG_TAG_ERROR, why);
    h->uffd = fd;
    atomic_store(&h->pages_arriving, 1);
  }
  uint8_t body[4 + 8 * LMG_MAX_REGIONS];
  for (int b = 0; b < 4; b++) body[b] = (uint8_t)(h->n >> (8 * b));
  for (size_t i = 0; i < h->n; i++) {
    uint64_t a = (uint64_t)(uintptr_t)h->regions[i].addr;
    for (int b = 0; b < 8; b++) body[4 + 8 * i + b] = (uint8_t)(a >> (8 * b));
  }
  return lmg_message_write(h->fd, LMG_TAG_REGISTERED, body, 4 + 8 * h->n, &h->uffd, 1);
}

static void set_phase(struct lmg_incoming *h, enum incoming_phase phase) {
  pthread_mutex_lock(&h->lock);
  if (h->phase == BEFORE_RUN) h->phase = phase;
  pthread_cond_broadcast(&h->changed);
  pthread_mutex_unlock(&h->lock);
}

/* Serves livemig once the guest runs (post-copy's end), until livemig is done. */
static void *after_run(void *arg) {
  struct lmg_incoming *h = arg;
  pthread_mutex_lock(&h->lock);
  while (h->phase == BEFORE_RUN) pthread_cond_wait(&h->changed, &h->lock);
  int running = h->phase == RUNNING;
  pthread_mutex_unlock(&h->lock);
  if (!running) return NULL;
  for (;;) {
    struct lmg_message m;
    if (lmg_message_read(h->fd, &m, -1, -1) != 0) {
      refuse_unreadable(h->fd, errno, m.len);
      break; /* livemig is done: the guest runs on */
    }
    int answered;
    if (m.tag == LMG_TAG_ALL_PRESENT) {
      if (h->uffd >= 0) close(h->uffd); /* closing it unregisters every range */
      h->uffd = -1;
      atomic_store(&h->pages_arriving, 0);
      if (h->ops.all_present) h->ops.all_present(h->ops.ctx);
      answered = reply(h->fd, LMG_TAG_ALL_PRESENT_ACK, NULL);
    } else {
      answered = refuse(h->fd, "the guest runs: only 'A' is expected, not 0x%02x", m.tag);
    }
    lmg_message_free(&m);
    if (answered != 0) break;
  }
  atomic_store(&h->livemig_gone, 1);
  return NULL;
}

/* ---- disk post-copy: the VMM asks for blocks ----------------------------------------- */

/* the layout of native/postcopy/disk_waits.h (DiskAsk, DiskAnswer): one host, native order */
struct disk_ask {
  uint64_t tag;
  uint32_t disk, kind;
  uint64_t offset, length;
};
struct disk_answer {
  uint64_t tag;
  int32_t error;
  uint32_t reserved;
};
enum { ASK_FETCH = 1, ASK_OVERWRITE = 2 };

/* Under ask_lock: the socket ended. Whether the blocks came is livemig's word ('A'): wait for it
   (or for livemig to go), then answer every waiter. */
static void asks_ended(struct lmg_incoming *h) {
  while (atomic_load(&h->pages_arriving) && !atomic_load(&h->livemig_gone)) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_nsec += 1000000;
    if (t.tv_nsec >= 1000000000) t.tv_sec++, t.tv_nsec -= 1000000000;
    pthread_cond_timedwait(&h->ask_answered, &h->ask_lock, &t);
  }
  int error = atomic_load(&h->pages_arriving) ? EIO : 0;
  for (struct ask_waiter *w = h->waiters; w; w = w->next)
    if (!w->done) w->done = 1, w->error = error;
  if (h->asks >= 0) close(h->asks);
  h->asks = -1;
}

/* Under ask_lock, as the reader: one answer, handed to its waiter. */
static void read_answer(struct lmg_incoming *h) {
  int fd = h->asks;
  h->ask_reader = 1;
  pthread_mutex_unlock(&h->ask_lock);
  struct disk_answer a;
  ssize_t n;
  do n = recv(fd, &a, sizeof a, 0);
  while (n < 0 && errno == EINTR);
  pthread_mutex_lock(&h->ask_lock);
  h->ask_reader = 0;
  if (n == (ssize_t)sizeof a) {
    for (struct ask_waiter *w = h->waiters; w; w = w->next)
      if (w->tag == a.tag && !w->done) w->done = 1, w->error = a.error;
  } else {
    asks_ended(h); /* closed (the service ended), or broken */
  }
  pthread_cond_broadcast(&h->ask_answered);
}

static int disk_ask(struct lmg_incoming *h, size_t disk, uint32_t kind, uint64_t offset, uint64_t length) {
  if (!h || disk >= h->nd || length == 0 || offset > h->disks[disk].size || length > h->disks[disk].size - offset) return errno = EINVAL, -1;
  if (kind == ASK_OVERWRITE && (offset % LMG_DISK_BLOCK || length % LMG_DISK_BLOCK)) return errno = EINVAL, -1;
  if (!atomic_load(&h->pages_arriving)) return 0; /* every block is here */
  struct ask_waiter w = {0};
  pthread_mutex_lock(&h->ask_lock);
  if (h->asks < 0) { /* none given (the guest runs by pre-copy), or the service has ended */
    pthread_mutex_unlock(&h->ask_lock);
    return atomic_load(&h->pages_arriving) ? (errno = EIO, -1) : 0;
  }
  w.tag = ++h->next_tag;
  struct disk_ask a = {w.tag, (uint32_t)disk, kind, offset, length};
  if (send(h->asks, &a, sizeof a, MSG_NOSIGNAL) != (ssize_t)sizeof a) {
    asks_ended(h);
    pthread_mutex_unlock(&h->ask_lock);
    return atomic_load(&h->pages_arriving) ? (errno = EIO, -1) : 0;
  }
  w.next = h->waiters;
  h->waiters = &w;
  while (!w.done) {
    if (h->ask_reader || h->asks < 0) pthread_cond_wait(&h->ask_answered, &h->ask_lock);
    else read_answer(h);
  }
  for (struct ask_waiter **at = &h->waiters; *at; at = &(*at)->next)
    if (*at == &w) {
      *at = w.next;
      break;
    }
  pthread_mutex_unlock(&h->ask_lock);
  if (w.error) return errno = w.error, -1;
  return 0;
}

int lmg_disk_fetch(struct lmg_incoming *h, size_t disk, uint64_t offset, uint64_t length) { return disk_ask(h, disk, ASK_FETCH, offset, length); }

int lmg_disk_overwrite(struct lmg_incoming *h, size_t disk, uint64_t offset, uint64_t length) { return disk_ask(h, disk, ASK_OVERWRITE, offset, length); }

struct lmg_incoming *lmg_incoming_open(const char *path, const char *name, int timeout_ms, char *err, size_t errlen) {
  if (!path) return fail(err, errlen, EINVAL, "a socket path is required"), NULL;
  if (name && !valid_name(name)) return fail(err, errlen, EINVAL, "the guest's name must be 1..63 characters of [A-Za-z0-9._-]"), NULL;
  struct bound_path bound;
  int lfd = listen_at(path, &bound, err, errlen);
  if (lfd < 0) return NULL;
  int fd = accept_peer(lfd, timeout_ms, -1);
  int e = errno;
  close(lfd);
  unlink_bound(&bound); /* one livemig only */
  if (fd < 0) return fail(err, errlen, e, "livemig did not connect to %s: %s", path, strerror(e)), NULL;
  struct lmg_incoming *h = calloc(1, sizeof *h);
  if (!h) return close(fd), fail(err, errlen, ENOMEM, "out of memory"), NULL;
  h->fd = fd;
  h->contract = LMG_CONTRACT_OLDEST;
  h->uffd = -1;
  atomic_init(&h->pages_arriving, 0);
  pthread_mutex_init(&h->lock, NULL);
  pthread_cond_init(&h->changed, NULL);
  h->asks = -1;
  atomic_init(&h->livemig_gone, 0);
  pthread_mutex_init(&h->ask_lock, NULL);
  pthread_cond_init(&h->ask_answered, NULL);
  h->phase = BEFORE_RUN;
  char hello[256];
  snprintf(hello, sizeof hello, "{\"contract\":%d,\"contractMax\":%d,\"role\":\"incoming\",\"pid\":%d,\"name\":\"%s\"}", LMG_CONTRACT_OLDEST, LMG_CONTRACT,
           (int)getpid(), name ? name : "guest");
  if (lmg_message_write(fd, LMG_TAG_HELLO, hello, strlen(hello), NULL, 0) != 0) {
    lmg_incoming_close(h);
    return fail(err, errlen, ECONNRESET, "livemig went away before handing over the regions"), NULL;
  }
  char why[256] = "";
  for (;;) {
    struct lmg_message m;
    if (lmg_message_read(fd, &m, -1, -1) != 0) {
      refuse_unreadable(fd, errno, m.len);
      lmg_incoming_close(h);
      return fail(err, errlen, ECONNRESET, "livemig went away before handing over the regions"), NULL;
    }
    int answered = 0, regions = m.tag == LMG_TAG_REGIONS;
    if (m.tag == LMG_TAG_CONTRACT) answered = answer_contract(fd, &m, 1, LMG_CONTRACT_OLDEST, &h->contract);
    else if (!regions) snprintf(why, sizeof why, "expected the regions ('M'), got 0x%02x", m.tag);
    else if (take_regions(h, &m, why, sizeof why) == 0) why[0] = 0;
    lmg_message_free(&m);
    if (answered != 0) {
      lmg_incoming_close(h);
      return fail(err, errlen, ECONNRESET, "livemig went away before handing over the regions"), NULL;
    }
    if (regions || why[0]) break;
  }
  if (!why[0]) {
    int started = pthread_create(&h->thread, NULL, after_run, h);
    if (started == 0) h->thread_started = 1;
    else snprintf(why, sizeof why, "starting the library's thread: %s", strerror(started));
  }
  if (why[0]) {
    reply(fd, LMG_TAG_ERROR, why);
    lmg_incoming_close(h);
    return fail(err, errlen, EPROTO, "%s", why), NULL;
  }
  if (reply(fd, LMG_TAG_MAPPED, NULL) != 0) {
    lmg_incoming_close(h);
    return fail(err, errlen, ECONNRESET, "livemig went away"), NULL;
  }
  return h;
}

size_t lmg_incoming_regions(const struct lmg_incoming *h, const struct lmg_region **regions) {
  *regions = h->regions;
  return h->n;
}

size_t lmg_incoming_disks(const struct lmg_incoming *h, const struct lmg_disk **disks) {
  *disks = h->disks;
  return h->nd;
}

int lmg_incoming_postcopy(const struct lmg_incoming *h) { return atomic_load(&h->pages_arriving); }

int lmg_incoming_wait(struct lmg_incoming *h, const struct lmg_incoming_ops *ops, char *err, size_t errlen) {
  if (!h || !ops) return fail(err, errlen, EINVAL, "the handle and ops are required");
  if (h->waited) return fail(err, errlen, EINVAL, "lmg_incoming_wait serves a handle once");
  struct lmg_incoming_ops taken;
  if (take_ops(&taken, sizeof taken, INCOMING_OPS_FIRST_SIZE, ops, "lmg_incoming_ops", err, errlen) != 0) return -1;
  if (!taken.load_state) return fail(err, errlen, EINVAL, "load_state is required");
  h->waited = 1;
  h->ops = taken;
  int loaded = 0;
  for (;;) {
    struct lmg_message m;
    if (lmg_message_read(h->fd, &m, -1, -1) != 0) {
      int e = errno;
      refuse_unreadable(h->fd, e, m.len);
      return fail(err, errlen, e, "livemig went away before the guest was told to run");
    }
    char why[512] = "";
    int answered;
    switch (m.tag) {
      case LMG_TAG_LOAD_STATE:
        if (h->ops.load_state(h->ops.ctx, m.body, m.len, why, sizeof why) == 0) {
          loaded = 1;
          answered = reply(h->fd, LMG_TAG_STATE_LOADED, NULL);
        } else {
          answered = refuse(h->fd, "%s", why[0] ? why : "the guest refused the state");
        }
        break;
      case LMG_TAG_REGISTER: answered = register_postcopy(h); break;
      case LMG_TAG_DISK_ASKS: answered = take_disk_asks(h, &m); break;
      case LMG_TAG_GO:
        if (!loaded) {
          answered = refuse(h->fd, "run before a state was loaded");
          break;
        }
        lmg_message_free(&m);
        if (reply(h->fd, LMG_TAG_GOING, NULL) != 0) return fail(err, errlen, ECONNRESET, "livemig went away");
        /* livemig waits for 'g' to end the hand-over, woken on this CPU (a unix socket's wake-up
         * pulls the waiter next to the writer): let it run before the guest's vCPUs take the CPU,
         * or it waits for the next scheduler tick (1-4 ms measured). The after-run thread is woken
         * only then: its wake-up inside the hand-over took a CPU livemig was waiting for. */
        sched_yield();
        set_phase(h, RUNNING); /* the after-run thread reads the socket from now on */
        return 0;
      case LMG_TAG_CONTRACT: answered = answer_contract(h->fd, &m, 0, LMG_CONTRACT_OLDEST, NULL); break;
      default: answered = refuse(h->fd, "unknown request 0x%02x", m.tag);
    }
    lmg_message_free(&m);
    if (answered != 0) return fail(err, errlen, ECONNRESET, "livemig went away");
  }
}

void lmg_incoming_close(struct lmg_incoming *h) {
  if (!h) return;
  shutdown(h->fd, SHUT_RDWR); /* ends the after-run thread's read */
  if (h->thread_started) {
    set_phase(h, CLOSING);
    pthread_join(h->thread, NULL);
  }
  close(h->fd);
  if (h->uffd >= 0) close(h->uffd);
  if (h->asks >= 0) close(h->asks);
  unmap_all(h);
  pthread_cond_destroy(&h->ask_answered);
  pthread_mutex_destroy(&h->ask_lock);
  pthread_cond_destroy(&h->changed);
  pthread_mutex_destroy(&h->lock);
  free(h);
}
