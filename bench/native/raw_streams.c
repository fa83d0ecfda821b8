// The raw-TCP ceiling with several streams: BYTES split over N connections, one sending thread
// and one receiving thread per connection, 1 MiB send()s from a buffer that stays in cache and
// a receiver that discards into one. What no migration engine can beat on the same path.
//   raw_streams recv ADDR PORT N BYTES [region|files]   prints {"port":P} when listening, then serves once
//   raw_streams send ADDR PORT N BYTES [region|files]   prints {"streams":N,"bytes":B,"ms":T,"cpu_s":C}
// With `region` both ends do what a migration must: the sender sends from BYTES of populated
// memory, each stream its slice, and the receiver receives into BYTES of populated memory, each
// stream into its slice (no buffer that stays in cache on either side). With `files` the same
// memory is a memfd reached through the file, as livemig's data path does (native/region/
// file_io.h): the sender preads each 1 MiB from a populated memfd into a buffer that stays in
// cache and sends it; the receiver receives into such a buffer and pwrites it into a fresh memfd.
// The receiver answers one byte per stream once it has all of that stream's bytes, so the
// sender's time runs from its first send to the last stream's answer.
// With `image:PATH` (one stream; BYTES the image's size) the sender reads only where PATH holds
// data (SEEK_DATA/SEEK_HOLE) and sends each piece as {u64 offset, u64 length} and its bytes; the
// receiver writes them at their offsets into PATH (its own, created at BYTES, sparse), starts
// their write-back every 64 MiB as it goes (sync_file_range), and makes it durable (fdatasync)
// before it answers: what moving a disk image's data over the link takes, at best.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)
#define MAX_STREAMS 64

struct job {
  int fd;
  uint64_t bytes;
  char* region;  // this stream's slice of the region, or NULL: a buffer that stays in cache
  int file;      // files: the memfd, this stream's slice from `at`; else -1
  uint64_t at;
};

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static double cpu_s(void) {
  struct rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

static void die(const char* what) {
  perror(what);
  exit(1);
}

static const char* image_path = NULL;  // image mode

static void recv_all(int fd, void* p, size_t n) {
  if (recv(fd, p, n, MSG_WAITALL) != (ssize_t)n) die("recv");
}

static void receive_image(struct job* j) {
  int out = open(image_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (out < 0 || ftruncate(out, (off_t)j->bytes) != 0) die("image");
  char* buf = malloc(CHUNK);
  if (!buf) die("malloc");
  uint64_t written = 0;
  for (;;) {
    uint64_t head[2];
    recv_all(j->fd, head, sizeof head);
    if (head[1] == 0) break;
    for (uint64_t got = 0; got < head[1];) {
      size_t want = head[1] - got < CHUNK ? (size_t)(head[1] - got) : CHUNK;
      recv_all(j->fd, buf, want);
      if (pwrite(out, buf, want, (off_t)(head[0] + got)) != (ssize_t)want) die("pwrite");
      got += want;
      written += want;
      if (written >= (64u << 20)) {
        sync_file_range(out, 0, 0, SYNC_FILE_RANGE_WRITE);  // the write-back goes on beside the transfer
        written = 0;
      }
    }
  }
  if (fdatasync(out) != 0) die("fdatasync");
  close(out);
  free(buf);
  char one = 1;
  if (send(j->fd, &one, 1, 0) != 1) die("send answer");
}

static void send_image(struct job* j) {
  int in = open(image_path, O_RDONLY | O_CLOEXEC);
  if (in < 0) die("image");
  char* buf = malloc(CHUNK);
  if (!buf) die("malloc");
  for (off_t at = 0; at < (off_t)j->bytes;) {
    off_t data = lseek(in, at, SEEK_DATA);
    if (data < 0) break;  // ENXIO: no more data
    off_t hole = lseek(in, data, SEEK_HOLE);
    if (hole < 0 || hole > (off_t)j->bytes) hole = (off_t)j->bytes;
    for (off_t p = data; p < hole;) {
      size_t want = hole - p < (off_t)CHUNK ? (size_t)(hole - p) : CHUNK;
      uint64_t head[2] = {(uint64_t)p, want};
      if (pread(in, buf, want, p) != (ssize_t)want) die("pread");
      if (send(j->fd, head, sizeof head, MSG_MORE) != sizeof head || send(j->fd, buf, want, 0) != (ssize_t)want) die("send");
      p += (off_t)want;
    }
    at = hole;
  }
  uint64_t end[2] = {0, 0};
  if (send(j->fd, end, sizeof end, 0) != sizeof end) die("send");
  char one;
  if (recv(j->fd, &one, 1, MSG_WAITALL) != 1) die("recv answer");
  close(in);
  free(buf);
}

static void* receive_one(void* arg) {
  struct job* j = arg;
  if (image_path) return receive_image(j), NULL;
  char* buf = malloc(CHUNK);
  if (!buf) die("malloc");
  for (uint64_t got = 0; got < j->bytes;) {
    size_t want = j->bytes - got < CHUNK ? (size_t)(j->bytes - got) : CHUNK;
    ssize_t n = recv(j->fd, j->region ? j->region + got : buf, j->region || j->file >= 0 ? want : CHUNK, 0);
    if (n <= 0) die("recv");
    if (j->file >= 0 && pwrite(j->file, buf, (size_t)n, (off_t)(j->at + got)) != n) die("pwrite");
    got += (uint64_t)n;
  }
  char one = 1;
  if (send(j->fd, &one, 1, 0) != 1) die("send answer");
  free(buf);
  return NULL;
}

static void* send_one(void* arg) {
  struct job* j = arg;
  if (image_path) return send_image(j), NULL;
  char* buf = malloc(CHUNK);
  if (!buf) die("malloc");
  memset(buf, 0x5a, CHUNK);
  for (uint64_t sent = 0; sent < j->bytes;) {
    size_t want = j->bytes - sent < CHUNK ? (size_t)(j->bytes - sent) : CHUNK;
    if (j->file >= 0 && pread(j->file, buf, want, (off_t)(j->at + sent)) != (ssize_t)want) die("pread");
    ssize_t n = send(j->fd, j->region ? j->region + sent : buf, want, 0);
    if (n <= 0) die("send");
    sent += (uint64_t)n;
  }
  char one;
  if (recv(j->fd, &one, 1, MSG_WAITALL) != 1) die("recv answer");
  free(buf);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc == 7 && strncmp(argv[6], "image:", 6) == 0) image_path = argv[6] + 6;
  if (argc != 6 && !(argc == 7 && (strcmp(argv[6], "region") == 0 || strcmp(argv[6], "files") == 0 || image_path))) {
    fprintf(stderr, "usage: raw_streams recv|send ADDR PORT STREAMS BYTES [region|files|image:PATH]\n");
    return 2;
  }
  if (image_path && atoi(argv[4]) != 1) {
    fprintf(stderr, "raw_streams: image:PATH takes one stream\n");
    return 2;
  }
  int streams = atoi(argv[4]);
  uint64_t bytes = strtoull(argv[5], NULL, 10);
  if (streams < 1 || streams > MAX_STREAMS || bytes == 0) {
    fprintf(stderr, "raw_streams: STREAMS must be 1..%d and BYTES positive\n", MAX_STREAMS);
    return 2;
  }
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[3]))};
  if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
    fprintf(stderr, "raw_streams: ADDR must be an IPv4 address\n");
    return 2;
  }
  int one = 1;
  struct job jobs[MAX_STREAMS];
  pthread_t threads[MAX_STREAMS];
  char* region = NULL;
  int file = -1;
  if (argc == 7 && strcmp(argv[6], "files") == 0) {
    file = memfd_create("raw-streams", MFD_CLOEXEC);
    if (file < 0 || ftruncate(file, (off_t)bytes) != 0) die("memfd");
    if (strcmp(argv[1], "send") == 0) {  // populated, through the file
      char* fill = malloc(CHUNK);
      if (!fill) die("malloc");
      memset(fill, 0x5a, CHUNK);
      for (uint64_t at = 0; at < bytes; at += CHUNK)
        if (pwrite(file, fill, bytes - at < CHUNK ? bytes - at : CHUNK, (off_t)at) < 0) die("pwrite");
      free(fill);
    }
  } else if (argc == 7) {
    region = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED) die("mmap");
    memset(region, 0x5a, bytes);  // every page really backed (and not the shared zero page)
  }
  for (uint64_t i = 0, at = 0; i < (uint64_t)streams; i++) {
    jobs[i].bytes = bytes / streams + (i < bytes % streams ? 1 : 0);
    jobs[i].region = region ? region + at : NULL;
    jobs[i].file = file;
    jobs[i].at = at;
    at += jobs[i].bytes;
  }
  if (strcmp(argv[1], "recv") == 0) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(l, (struct sockaddr*)&sa, sizeof sa) < 0 || listen(l, MAX_STREAMS) < 0) die("listen");
    socklen_t len = sizeof sa;
    getsockname(l, (struct sockaddr*)&sa, &len);
    printf("{\"port\":%d}\n", ntohs(sa.sin_port));
    fflush(stdout);
    for (int i = 0; i < streams; i++) {
      jobs[i].fd = accept(l, NULL, NULL);
      if (jobs[i].fd < 0) die("accept");
      setsockopt(jobs[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    double c0 = cpu_s();
    for (int i = 0; i < streams; i++) pthread_create(&threads[i], NULL, receive_one, &jobs[i]);
    for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
    fprintf(stderr, "{\"receiver_cpu_s\":%.3f}\n", cpu_s() - c0);
    return 0;
  }
  if (strcmp(argv[1], "send") != 0) die("role");
  for (int i = 0; i < streams; i++) {
    jobs[i].fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(jobs[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(jobs[i].fd, (struct sockaddr*)&sa, sizeof sa) < 0) die("connect");
  }
  double c0 = cpu_s(), t0 = now_ms();
  for (int i = 0; i < streams; i++) pthread_create(&threads[i], NULL, send_one, &jobs[i]);
  for (int i = 0; i < streams; i++) pthread_join(threads[i], NULL);
  printf("{\"streams\":%d,\"bytes\":%llu,\"ms\":%.1f,\"cpu_s\":%.3f}\n", streams, (unsigned long long)bytes, now_ms() - t0, cpu_s() - c0);
  return 0;
}
