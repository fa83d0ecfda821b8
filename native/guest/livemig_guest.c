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

static int valid_name(const char *s) {
  size_t n = strnlen(s, LMG_NAME_MAX);
  if (n == 0 || n >= LMG_NAME_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) return 0;
  }
  return 1;
}

/* ---- sockets and framing ------------------------------------------------------------ */

static socklen_t unix_address(const char *path, struct sockaddr_un *a) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  size_t n = strlen(path);
  if (n == 0 || n >= sizeof a->sun_path) return 0;
  memcpy(a->sun_path, path, n);
  if (path[0] == '@') a->sun_path[0] = '\0'; /* the abstract namespace */
  return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '@' ? 0 : 1));
}

static int listen_at(const char *path, char *err, size_t errlen) {
  struct sockaddr_un a;
  socklen_t alen = unix_address(path, &a);
  if (!alen) return fail(err, errlen, EINVAL, "socket path must be 1..%zu characters", sizeof a.sun_path - 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return fail(err, errlen, errno, "socket: %s", strerror(errno));
  if (path[0] != '@') {
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path); /* a stale socket of an earlier run */
  }
  /* only this user may connect to a path socket (connecting needs write permission on it) */
  mode_t was = umask(0177);
  int bound = bind(fd, (struct sockaddr *)&a, alen);
  umask(was);
  if (bound != 0 || listen(fd, 4) != 0) {
    int e = errno;
    close(fd);
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

static int accept_within(int lfd, int timeout_ms) {
  struct pollfd p = {lfd, POLLIN, 0};
  int r;
  do r = poll(&p, 1, timeout_ms);
  while (r < 0 && errno == EINTR);
  if (r == 0) return errno = ETIMEDOUT, -1;
  if (r < 0) return -1;
  int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  if (fd >= 0 && !peer_allowed(fd)) {
    close(fd);
    return errno = EACCES, -1;
  }
  return fd;
}

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

/* 'V' + u32 LE: the contract version livemig speaks from now on; only before any other request. */
static int answer_contract(int fd, const struct lmg_message *m, int still_open) {
  char why[160];
  uint32_t v = m->len == 4 ? (uint32_t)m->body[0] | (uint32_t)m->body[1] << 8 | (uint32_t)m->body[2] << 16 | (uint32_t)m->body[3] << 24 : 0;
  if (!still_open) snprintf(why, sizeof why, "the contract is agreed first, before any other request");
  else if (m->len != 4) snprintf(why, sizeof why, "a contract version is a u32, not %zu bytes", m->len);
  else if (v < LMG_CONTRACT_OLDEST || v > LMG_CONTRACT)
    snprintf(why, sizeof why, "contract %u is outside this library's %d..%d", v, LMG_CONTRACT_OLDEST, LMG_CONTRACT);
  else return reply(fd, LMG_TAG_CONTRACT_AGREED, NULL);
  return reply(fd, LMG_TAG_ERROR, why);
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

struct lmg_source {
  int lfd;
  /* registered with a daemon: the library dials this path instead of listening */
  char dial[108];
  char name[LMG_NAME_MAX];
  struct lmg_region regions[LMG_MAX_REGIONS];
  size_t n;
  struct lmg_source_ops ops;
  /* the pause's state, kept across connections: after 'C' only livemig may end the pause */
  int paused, committed, self_resumed;
  uint32_t lease_ms;
  pthread_t thread;
};

static char *source_hello(const struct lmg_source *s) {
  size_t cap = 512 + s->n * 320, at = 0;
  char *h = malloc(cap);
  if (!h) return NULL;
  /* it starts at the oldest contract, which a livemig that knows no negotiation takes; livemig may raise it with 'V' */
  at += (size_t)snprintf(h + at, cap - at, "{\"contract\":%d,\"contractMax\":%d,\"role\":\"source\",\"pid\":%d,\"name\":\"%s\",\"regions\":[",
                         LMG_CONTRACT_OLDEST, LMG_CONTRACT, (int)getpid(), s->name);
  for (size_t i = 0; i < s->n; i++) {
    const struct lmg_region *r = &s->regions[i];
    at += (size_t)snprintf(h + at, cap - at,
                           "%s{\"id\":%u,\"name\":\"%s\",\"size\":%llu,\"pageSize\":%u,\"address\":\"%llu\",\"offset\":%llu,\"tracking\":\"%s\"}",
                           i ? "," : "", r->id, r->name, (unsigned long long)r->size, PAGE, (unsigned long long)(uintptr_t)r->addr,
                           (unsigned long long)r->offset, r->tracked ? "uffd-wp-async" : "none");
  }
  snprintf(h + at, cap - at, "]}");
  return h;
}

static void self_resume(struct lmg_source *s) {
  s->paused = 0;
  s->self_resumed = 1;
  s->ops.resume(s->ops.ctx);
}

/* One livemig connection, until it closes; 1 when the guest was released (stop serving). */
static int serve_source(struct lmg_source *s, int fd) {
  for (int contract_open = 1;;) {
    const int leased = s->paused && !s->committed && s->lease_ms > 0;
    struct lmg_message m;
    int timeout_ms = !leased ? -1 : s->lease_ms > INT_MAX ? INT_MAX : (int)s->lease_ms;
    int e = lmg_message_read(fd, &m, timeout_ms, -1) == 0 ? 0 : errno;
    if (e == ETIMEDOUT && leased) {
      /* livemig is stalled before its point of commitment: the destination cannot run the guest */
      self_resume(s);
      continue;
    }
    if (e) {
      if (s->paused && !s->committed) self_resume(s); /* livemig went away before committing */
      return 0;
    }
    int ok = 0;
    char why[512] = "";
    switch (m.tag) {
      case LMG_TAG_CONTRACT:
        ok = answer_contract(fd, &m, contract_open) == 0;
        break;
      case LMG_TAG_PAUSE: {
        uint8_t *state = NULL;
        size_t len = 0;
        if (s->ops.pause(s->ops.ctx, &state, &len, why, sizeof why) != 0) {
          ok = reply(fd, LMG_TAG_ERROR, why[0] ? why : "the guest refused to pause") == 0;
          break;
        }
        s->paused = 1, s->committed = 0, s->self_resumed = 0;
        s->lease_ms = m.len == 4 ? (uint32_t)m.body[0] | (uint32_t)m.body[1] << 8 | (uint32_t)m.body[2] << 16 | (uint32_t)m.body[3] << 24 : 0;
        ok = len <= LMG_MAX_BODY && lmg_message_write(fd, LMG_TAG_PAUSED, state, len, NULL, 0) == 0;
        free(state);
        if (s->ops.paused) {
          /* livemig, woken by 'p' on this CPU, goes on with the hand-over before this does more */
          sched_yield();
          s->ops.paused(s->ops.ctx);
        }
        break;
      }
      case LMG_TAG_COMMIT:
        if (!s->paused || s->self_resumed) {
          ok = reply(fd, LMG_TAG_ERROR, "not paused: the guest resumed itself when its lease ran out") == 0;
        } else {
          s->committed = 1;
          ok = reply(fd, LMG_TAG_COMMITTED, NULL) == 0;
        }
        break;
      case LMG_TAG_RESUME:
        if (s->paused) s->ops.resume(s->ops.ctx);
        s->paused = 0, s->committed = 0;
        ok = reply(fd, LMG_TAG_RESUMED, NULL) == 0;
        break;
      case LMG_TAG_THROTTLE:
        if (m.len != 1 || m.body[0] > 99) ok = reply(fd, LMG_TAG_ERROR, "throttle takes one byte, a percent in 0..99") == 0;
        else if (!s->ops.throttle) ok = reply(fd, LMG_TAG_ERROR, "this guest cannot be throttled") == 0;
        else if (s->ops.throttle(s->ops.ctx, m.body[0]) != 0) ok = reply(fd, LMG_TAG_ERROR, "the guest refused the throttle") == 0;
        else ok = reply(fd, LMG_TAG_THROTTLED, NULL) == 0;
        break;
      case LMG_TAG_RELEASE:
        if (!s->paused || !s->committed) {
          ok = reply(fd, LMG_TAG_ERROR, "release before a committed pause: the guest would be lost") == 0;
          break;
        }
        reply(fd, LMG_TAG_RELEASED, NULL);
        lmg_message_free(&m);
        s->ops.released(s->ops.ctx);
        return 1;
      default:
        snprintf(why, sizeof why, "unknown request 0x%02x", m.tag);
        ok = reply(fd, LMG_TAG_ERROR, why) == 0;
    }
    if (m.tag != LMG_TAG_CONTRACT) contract_open = 0;
    lmg_message_free(&m);
    if (!ok) {
      if (s->paused && !s->committed) self_resume(s);
      return 0;
    }
  }
}

/* how long a registered guest waits before dialling its daemon again (it is away, or refused us) */
#define REDIAL_MS 500

static void sleep_ms(int ms) {
  struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&t, &t) != 0 && errno == EINTR) {
  }
}

/*
 * A registered guest dials its daemon, and keeps dialling until one answers: a daemon that
 * restarts finds its guests again. Only root or this user may be the daemon, as only they may
 * connect to a guest that listens.
 */
static int dial_daemon(const struct lmg_source *s) {
  struct sockaddr_un a;
  socklen_t alen = unix_address(s->dial, &a);
  for (;;) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&a, alen) == 0) {
      if (peer_allowed(fd)) return fd;
      close(fd);
    } else {
      int e = errno;
      close(fd);
      if (e != ENOENT && e != ECONNREFUSED && e != EAGAIN && e != EINTR) return errno = e, -1;
    }
    sleep_ms(REDIAL_MS);
  }
}

static void *source_thread(void *arg) {
  struct lmg_source *s = arg;
  if (s->ops.thread_start) s->ops.thread_start(s->ops.ctx);
  char *hello = source_hello(s);
  int fds[LMG_MAX_REGIONS];
  for (size_t i = 0; i < s->n; i++) fds[i] = s->regions[i].fd;
  for (int first = 1;; first = 0) {
    if (s->dial[0] && !first) sleep_ms(REDIAL_MS); /* the daemon let us go (or went away): not in a tight loop */
    int fd = s->dial[0] ? dial_daemon(s) : accept_within(s->lfd, -1);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EACCES) continue; /* EACCES: a stranger, turned away */
      break;
    }
    int released = hello && lmg_message_write(fd, LMG_TAG_HELLO, hello, strlen(hello), fds, s->n) == 0 && serve_source(s, fd);
    close(fd);
    if (released) break;
  }
  free(hello);
  return NULL;
}

static struct lmg_source *source_start(const char *listen_path, const char *dial_path, const char *name, const struct lmg_region *regions,
                                       size_t n, const struct lmg_source_ops *ops, char *err, size_t errlen) {
  if (n == 0 || n > LMG_MAX_REGIONS) return fail(err, errlen, EINVAL, "a guest hands over 1..%d regions, not %zu", LMG_MAX_REGIONS, n), NULL;
  if (!ops || !ops->pause || !ops->resume || !ops->released) return fail(err, errlen, EINVAL, "pause, resume and released are required"), NULL;
  if (name && !valid_name(name)) return fail(err, errlen, EINVAL, "the guest's name must be 1..63 characters of [A-Za-z0-9._-]"), NULL;
  for (size_t i = 0; i < n; i++) {
    const struct lmg_region *r = &regions[i];
    if (!valid_name(r->name)) return fail(err, errlen, EINVAL, "region %zu: a name is 1..63 characters of [A-Za-z0-9._-]", i), NULL;
    if (!r->size || r->size % PAGE || r->offset % PAGE || (uintptr_t)r->addr % PAGE)
      return fail(err, errlen, EINVAL, "region %s: address, size and offset must be page-aligned and the size positive", r->name), NULL;
    for (size_t j = 0; j < i; j++) {
      if (regions[j].id == r->id) return fail(err, errlen, EINVAL, "region id %u is used twice", r->id), NULL;
    }
  }
  struct lmg_source *s = calloc(1, sizeof *s);
  if (!s) return fail(err, errlen, ENOMEM, "out of memory"), NULL;
  snprintf(s->name, sizeof s->name, "%s", name ? name : "guest");
  memcpy(s->regions, regions, n * sizeof *regions);
  s->n = n;
  s->ops = *ops;
  s->lfd = -1;
  if (dial_path) {
    struct sockaddr_un a;
    if (!unix_address(dial_path, &a)) return free(s), fail(err, errlen, EINVAL, "socket path must be 1..%zu characters", sizeof a.sun_path - 1), NULL;
    snprintf(s->dial, sizeof s->dial, "%s", dial_path);
  } else {
    s->lfd = listen_at(listen_path, err, errlen);
    if (s->lfd < 0) return free(s), NULL;
  }
  if (pthread_create(&s->thread, NULL, source_thread, s) != 0) {
    if (s->lfd >= 0) close(s->lfd);
    free(s);
    return fail(err, errlen, EAGAIN, "starting the control thread failed"), NULL;
  }
  pthread_detach(s->thread);
  return s;
}

struct lmg_source *lmg_source_start(const char *path, const char *name, const struct lmg_region *regions, size_t n,
                                    const struct lmg_source_ops *ops, char *err, size_t errlen) {
  return source_start(path, NULL, name, regions, n, ops, err, errlen);
}

struct lmg_source *lmg_source_register(const char *daemon_path, const char *name, const struct lmg_region *regions, size_t n,
                                       const struct lmg_source_ops *ops, char *err, size_t errlen) {
  return source_start(NULL, daemon_path, name, regions, n, ops, err, errlen);
}

/* ---- destination -------------------------------------------------------------------- */

struct lmg_incoming {
  int fd;
  struct lmg_region regions[LMG_MAX_REGIONS];
  size_t n;
  int uffd;
  struct lmg_incoming_ops ops;
  pthread_t thread;
  int thread_started;
};

static uint64_t le(const uint8_t *p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; i--) v = v << 8 | p[i];
  return v;
}

static void unmap_all(struct lmg_incoming *h) {
  for (size_t i = 0; i < h->n; i++) {
    if (h->regions[i].addr) munmap(h->regions[i].addr, h->regions[i].size);
    if (h->regions[i].fd >= 0) close(h->regions[i].fd);
  }
  h->n = 0;
}

/*
 * 'M': u8 flags (bit 0: populate) | u32 count | count x (u32 id | u64 size | u64 offset |
 * u8 name length | name), one memfd per region with it. Maps them; a reason on failure.
 */
static int take_regions(struct lmg_incoming *h, struct lmg_message *m, char *why, size_t whylen) {
  const uint8_t *p = m->body, *end = m->body + m->len;
  if (m->len < 5) return snprintf(why, whylen, "regions message of %zu bytes", m->len), -1;
  int populate = p[0] & 1;
  uint32_t count = (uint32_t)le(p + 1, 4);
  p += 5;
  if (count == 0 || count > LMG_MAX_REGIONS || count != m->nfds)
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
    r->fd = m->fds[i];
    m->fds[i] = -1;
    r->addr = NULL;
    h->n = i + 1;
    struct stat st;
    if (!r->size || r->size % PAGE || r->offset % PAGE) return snprintf(why, whylen, "region %s: unaligned", r->name), -1;
    if (fstat(r->fd, &st) != 0 || (uint64_t)st.st_size < r->offset + r->size)
      return snprintf(why, whylen, "region %s: its memfd is smaller than offset + size", r->name), -1;
    void *a = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, (off_t)r->offset);
    if (a == MAP_FAILED) return snprintf(why, whylen, "region %s: mmap: %s", r->name, strerror(errno)), -1;
    r->addr = a;
  }
  m->nfds = 0;
  if (populate) {
    /* every page mapped now, while pre-copy runs, so the guest runs at memory speed at once */
    for (size_t i = 0; i < h->n; i++) (void)madvise(h->regions[i].addr, h->regions[i].size, MADV_POPULATE_WRITE);
  }
  return 0;
}

struct lmg_incoming *lmg_incoming_open(const char *path, const char *name, int timeout_ms, char *err, size_t errlen) {
  if (name && !valid_name(name)) return fail(err, errlen, EINVAL, "the guest's name must be 1..63 characters of [A-Za-z0-9._-]"), NULL;
  int lfd = listen_at(path, err, errlen);
  if (lfd < 0) return NULL;
  int fd;
  do fd = accept_within(lfd, timeout_ms);
  while (fd < 0 && errno == EACCES); /* a stranger, turned away: wait for livemig */
  int e = errno;
  close(lfd);
  if (path[0] != '@') unlink(path);
  if (fd < 0) return fail(err, errlen, e, "livemig did not connect to %s: %s", path, strerror(e)), NULL;
  struct lmg_incoming *h = calloc(1, sizeof *h);
  if (!h) return close(fd), fail(err, errlen, ENOMEM, "out of memory"), NULL;
  h->fd = fd;
  h->uffd = -1;
  char hello[256];
  snprintf(hello, sizeof hello, "{\"contract\":%d,\"contractMax\":%d,\"role\":\"incoming\",\"pid\":%d,\"name\":\"%s\"}", LMG_CONTRACT_OLDEST, LMG_CONTRACT,
           (int)getpid(), name ? name : "guest");
  struct lmg_message m;
  int gone = lmg_message_write(fd, LMG_TAG_HELLO, hello, strlen(hello), NULL, 0) != 0 || lmg_message_read(fd, &m, -1, -1) != 0;
  while (!gone && m.tag == LMG_TAG_CONTRACT) {
    gone = answer_contract(fd, &m, 1) != 0;
    lmg_message_free(&m);
    gone = gone || lmg_message_read(fd, &m, -1, -1) != 0;
  }
  if (gone) {
    lmg_incoming_close(h);
    return fail(err, errlen, ECONNRESET, "livemig went away before handing over the regions"), NULL;
  }
  char why[256] = "";
  if (m.tag != LMG_TAG_REGIONS) snprintf(why, sizeof why, "expected the regions ('M'), got 0x%02x", m.tag);
  else if (take_regions(h, &m, why, sizeof why) == 0) why[0] = 0;
  lmg_message_free(&m);
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

int lmg_incoming_postcopy(const struct lmg_incoming *h) { return h->uffd >= 0; }

/* 'U': every region registered for minor faults on one userfaultfd, which goes to livemig. */
static int register_postcopy(struct lmg_incoming *h) {
  char why[256];
  if (h->uffd < 0) {
    int fd = uffd_with(UFFD_FEATURE_MINOR_SHMEM, why, sizeof why);
    if (fd < 0) return reply(h->fd, LMG_TAG_ERROR, why);
    for (size_t i = 0; i < h->n; i++) {
      struct lmg_region *r = &h->regions[i];
      /* the pages stay in the memfd; only this mapping's entries go, so every touch faults */
      struct uffdio_register reg = {.range = {(uint64_t)(uintptr_t)r->addr, r->size}, .mode = UFFDIO_REGISTER_MODE_MINOR};
      if (madvise(r->addr, r->size, MADV_DONTNEED) != 0 || ioctl(fd, UFFDIO_REGISTER, &reg) != 0 || !(reg.ioctls & (1ULL << _UFFDIO_CONTINUE))) {
        snprintf(why, sizeof why, "registering region %s for minor faults: %s", r->name, strerror(errno));
        close(fd);
        return reply(h->fd, LMG_TAG_ERROR, why);
      }
    }
    h->uffd = fd;
  }
  uint8_t body[4 + 8 * LMG_MAX_REGIONS];
  for (int b = 0; b < 4; b++) body[b] = (uint8_t)(h->n >> (8 * b));
  for (size_t i = 0; i < h->n; i++) {
    uint64_t a = (uint64_t)(uintptr_t)h->regions[i].addr;
    for (int b = 0; b < 8; b++) body[4 + 8 * i + b] = (uint8_t)(a >> (8 * b));
  }
  return lmg_message_write(h->fd, LMG_TAG_REGISTERED, body, 4 + 8 * h->n, &h->uffd, 1);
}

static void *after_go(void *arg) {
  struct lmg_incoming *h = arg;
  for (;;) {
    struct lmg_message m;
    if (lmg_message_read(h->fd, &m, -1, -1) != 0) break; /* livemig is done: the guest runs on */
    int ok;
    if (m.tag == LMG_TAG_ALL_PRESENT) {
      if (h->uffd >= 0) close(h->uffd); /* closing it unregisters every range */
      h->uffd = -1;
      if (h->ops.all_present) h->ops.all_present(h->ops.ctx);
      ok = reply(h->fd, LMG_TAG_ALL_PRESENT_ACK, NULL) == 0;
    } else {
      ok = reply(h->fd, LMG_TAG_ERROR, "the guest runs: only 'A' is expected") == 0;
    }
    lmg_message_free(&m);
    if (!ok) break;
  }
  return NULL;
}

int lmg_incoming_wait(struct lmg_incoming *h, const struct lmg_incoming_ops *ops, char *err, size_t errlen) {
  if (!ops || !ops->load_state) return fail(err, errlen, EINVAL, "load_state is required");
  h->ops = *ops;
  int loaded = 0;
  for (;;) {
    struct lmg_message m;
    if (lmg_message_read(h->fd, &m, -1, -1) != 0) return fail(err, errlen, errno, "livemig went away before the guest was told to run");
    char why[512] = "";
    int ok = 1;
    switch (m.tag) {
      case LMG_TAG_LOAD_STATE:
        if (ops->load_state(ops->ctx, m.body, m.len, why, sizeof why) == 0) {
          loaded = 1;
          ok = reply(h->fd, LMG_TAG_STATE_LOADED, NULL) == 0;
        } else {
          ok = reply(h->fd, LMG_TAG_ERROR, why[0] ? why : "the guest refused the state") == 0;
        }
        break;
      case LMG_TAG_REGISTER:
        ok = register_postcopy(h) == 0;
        break;
      case LMG_TAG_CONTRACT:
        ok = answer_contract(h->fd, &m, 0) == 0;
        break;
      case LMG_TAG_GO:
        if (!loaded) {
          ok = reply(h->fd, LMG_TAG_ERROR, "run before a state was loaded") == 0;
          break;
        }
        lmg_message_free(&m);
        if (reply(h->fd, LMG_TAG_GOING, NULL) != 0) return fail(err, errlen, ECONNRESET, "livemig went away");
        /* livemig waits for 'g' to end the hand-over, woken on this CPU (a unix socket's wake-up
         * pulls the waiter next to the writer): let it run before the guest's vCPUs take the CPU,
         * or it waits for the next scheduler tick (1-4 ms measured) */
        sched_yield();
        if (pthread_create(&h->thread, NULL, after_go, h) == 0) h->thread_started = 1;
        return 0;
      default:
        snprintf(why, sizeof why, "unknown request 0x%02x", m.tag);
        ok = reply(h->fd, LMG_TAG_ERROR, why) == 0;
    }
    lmg_message_free(&m);
    if (!ok) return fail(err, errlen, ECONNRESET, "livemig went away");
  }
}

void lmg_incoming_close(struct lmg_incoming *h) {
  if (!h) return;
  shutdown(h->fd, SHUT_RDWR);
  if (h->thread_started) pthread_join(h->thread, NULL);
  close(h->fd);
  if (h->uffd >= 0) close(h->uffd);
  unmap_all(h);
  free(h);
}
