/*
 * The guest library's lifecycle, driven by test/c-guest.test.ts: one command a line on stdin,
 * one JSON line on stdout for each answer and each callback, so that the test can play livemig
 * (or a daemon) and check what the library did and in which order.
 *
 *   start PATH NAME [OPS_SIZE [TAIL]]  lmg_source_start; ops.size OPS_SIZE, and every byte the
 *                                      caller's struct has past the library's set to TAIL
 *   register DAEMON_PATH NAME          lmg_source_register
 *   stop                               lmg_source_stop
 *   stop-in-pause                      the next pause callback calls lmg_source_stop itself
 *   version                            lmg_version
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "livemig_guest.h"

#define REGION_BYTES (16 * 4096)

static pthread_mutex_t out = PTHREAD_MUTEX_INITIALIZER;
static struct lmg_source *serving;
static struct lmg_region region;
static int pauses;
static int stop_in_pause;

/* a line at a time from either thread: the library's callbacks print too */
static void say(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&out);
  vprintf(fmt, ap);
  putchar('\n');
  fflush(stdout);
  pthread_mutex_unlock(&out);
  va_end(ap);
}

/* err is the library's (or this driver's, errno EINVAL): names and paths only, no quote or backslash to escape */
static void say_error(const char *err) { say("{\"error\":\"%s\",\"errno\":%d}", err, errno); }
static void say_usage_error(const char *err) {
  errno = EINVAL;
  say_error(err);
}

static int on_pause(void *ctx, uint8_t **state, size_t *len, char *why, size_t whylen) {
  (void)ctx, (void)why, (void)whylen;
  if (stop_in_pause) {
    stop_in_pause = 0;
    int r = lmg_source_stop(serving);
    say("{\"event\":\"stop-in-callback\",\"result\":%d,\"errno\":%d}", r, r < 0 ? errno : 0);
  }
  char *s = malloc(32);
  if (!s) return -1;
  *len = (size_t)snprintf(s, 32, "state-%d", ++pauses);
  *state = (uint8_t *)s;
  say("{\"event\":\"pause\"}");
  return 0;
}
static void on_resume(void *ctx) {
  (void)ctx;
  say("{\"event\":\"resume\"}");
}
static void on_released(void *ctx) {
  (void)ctx;
  say("{\"event\":\"released\"}");
}

static void start(const char *path, const char *name, int dial, const char *ops_size, const char *tail) {
  if (serving) {
    say_usage_error("a handle serves already: stop it first");
    return;
  }
  struct lmg_source_ops ops = {.size = sizeof ops, .pause = on_pause, .resume = on_resume, .released = on_released};
  /* the caller's struct as one built against another version of the header would lay it out */
  unsigned char caller[sizeof ops + 64] = {0};
  memcpy(caller, &ops, sizeof ops);
  if (ops_size) {
    size_t size = strtoul(ops_size, NULL, 10);
    if (size > sizeof caller) {
      say_usage_error("OPS_SIZE is larger than this driver's room");
      return;
    }
    memcpy(caller, &size, sizeof size);
    if (tail) memset(caller + sizeof ops, atoi(tail), size > sizeof ops ? size - sizeof ops : 0);
  }
  char err[512];
  const struct lmg_source_ops *as_built = (const struct lmg_source_ops *)caller;
  serving = dial ? lmg_source_register(path, name, &region, 1, as_built, err, sizeof err) : lmg_source_start(path, name, &region, 1, as_built, err, sizeof err);
  if (serving) say("{\"started\":true}");
  else say_error(err);
}

int main(void) {
  int fd = memfd_create("lmg-lifecycle", MFD_CLOEXEC);
  void *addr = fd < 0 || ftruncate(fd, REGION_BYTES) != 0 ? MAP_FAILED : mmap(NULL, REGION_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (addr == MAP_FAILED) return perror("lmg_lifecycle: memory"), 1;
  region = (struct lmg_region){.id = 0, .name = "ram", .addr = addr, .size = REGION_BYTES, .fd = fd, .offset = 0};
  char line[512];
  while (fgets(line, sizeof line, stdin)) {
    char *words[5] = {0};
    int n = 0;
    for (char *w = strtok(line, " \n"); w && n < 5; w = strtok(NULL, " \n")) words[n++] = w;
    if (n == 0) continue;
    if (!strcmp(words[0], "start") && n >= 3) {
      start(words[1], words[2], 0, words[3], words[4]);
    } else if (!strcmp(words[0], "register") && n == 3) {
      start(words[1], words[2], 1, NULL, NULL);
    } else if (!strcmp(words[0], "stop")) {
      int r = lmg_source_stop(serving);
      if (r < 0) say("{\"error\":\"lmg_source_stop\",\"errno\":%d}", errno);
      else say("{\"stopped\":%d}", r);
      if (r >= 0) serving = NULL;
    } else if (!strcmp(words[0], "stop-in-pause")) {
      stop_in_pause = 1;
      say("{\"armed\":true}");
    } else if (!strcmp(words[0], "version")) {
      int oldest = 0, newest = lmg_version(&oldest);
      say("{\"version\":%d,\"oldest\":%d,\"header\":%d}", newest, oldest, LMG_CONTRACT);
    } else {
      say_usage_error("unknown command");
    }
  }
  return 0;
}
