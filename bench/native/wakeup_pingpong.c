// Round-trip latency of a one-byte ping-pong between two processes over a unix socketpair,
// with the CPUs idle between pings (as in a migration's hand-over, where each step waits for
// the previous one). Shows what waking a thread on another, halted vCPU costs on this host.
// usage: wakeup_pingpong MODE COUNT [GAP_US]
//   block:   both block in recv, the scheduler places them
//   samecpu: both pinned to CPU 0
//   diffcpu: pinned to CPUs 0 and 1 (every hop wakes the other vCPU)
//   spin:    both poll with MSG_DONTWAIT (no thread ever sleeps)
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}
static void pin(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  if (sched_setaffinity(0, sizeof s, &s) != 0) perror("sched_setaffinity"), exit(1);
}
static void read_one(int fd, int spin) {
  char b;
  for (;;) {
    ssize_t r = recv(fd, &b, 1, spin ? MSG_DONTWAIT : 0);
    if (r == 1) return;
    if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;  // spinning, or a signal: poll again
    perror("recv"), exit(1);
  }
}
static int by_value(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}
int main(int argc, char** argv) {
  if (argc < 3) return fprintf(stderr, "usage: %s block|samecpu|diffcpu|spin COUNT [GAP_US]\n", argv[0]), 2;
  const char* mode = argv[1];
  int n = atoi(argv[2]), gap = argc > 3 ? atoi(argv[3]) : 1000;
  int spin = !strcmp(mode, "spin"), same = !strcmp(mode, "samecpu"), diff = !strcmp(mode, "diffcpu");
  if (n < 100) return fprintf(stderr, "COUNT must be at least 100\n"), 2;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return perror("socketpair"), 1;
  if (fork() == 0) {
    if (same) pin(0);
    if (diff) pin(1);
    for (int i = 0; i < n; i++) read_one(sv[1], spin), send(sv[1], "x", 1, 0);
    _exit(0);
  }
  if (same || diff) pin(0);
  double* rtt = malloc(n * sizeof(double));
  for (int i = 0; i < n; i++) {
    usleep(gap);
    double t = now_us();
    send(sv[0], "x", 1, 0);
    read_one(sv[0], spin);
    rtt[i] = now_us() - t;
  }
  wait(NULL);
  qsort(rtt, n, sizeof(double), by_value);
  printf("{\"bench\":\"wakeup_pingpong\",\"mode\":\"%s\",\"gap_us\":%d,\"count\":%d,\"rtt_p50_us\":%.1f,\"rtt_p90_us\":%.1f,\"rtt_p99_us\":%.1f}\n", mode, gap,
         n, rtt[n / 2], rtt[n * 9 / 10], rtt[n * 99 / 100]);
  return 0;
}
