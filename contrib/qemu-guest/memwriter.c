/*
 * memwriter: the workload of livemig's QEMU test guest.
 *
 * It runs as the guest's only program (exec'd by /init) and does three
 * things at once, so that a test on the host can tell whether a migration
 * kept the guest's memory and its liveness intact:
 *
 *   1. It owns a region of MIB MiB and keeps every 4 KiB page of it in a
 *      checkable state: the page holds its own index, its generation and a
 *      checksum of its body, and the body is a pattern derived from
 *      (index, generation).  The generation of each page is also kept in an
 *      array in this program's own memory.  Both the region and the array
 *      are guest RAM, so a correct migration carries them together; a page
 *      lost, stale or torn by the migration shows up as a mismatch.
 *   2. It dirties memory: it rewrites RATE MiB/s of randomly chosen pages,
 *      paced in ~1 ms steps, so the migration has a known dirty rate.
 *   3. It talks on a serial port (default /dev/ttyS1; ttyS0 stays the kernel
 *      console): a heartbeat line every HB_MS ms, and answers to commands.
 *
 * Settings come from the kernel command line (memwriter.mib=64
 * memwriter.rate=16 memwriter.hb_ms=1 memwriter.tty=/dev/ttyS1), read from
 * /proc/cmdline, and may be overridden by argv in the same key=value form
 * (mib=64 rate=16 ...), which makes the program testable on the host too.
 *
 * Serial protocol (one line each, '\n' terminated):
 *   guest -> host: READY mib=<n> rate=<r> hb_ms=<h> pages=<p>   (once filled)
 *                  HB <seq> <pages_written_total>               (every HB_MS)
 *   host -> guest: PING         -> PONG
 *                  CHECK        -> CHECK ok pages=<n> bad=<k> first_bad=<i|-1>
 *                                  ("ok" means the scan ran; the verdict is bad=)
 *                  RATE <r>     -> RATE ok <r>   (change the dirty rate)
 *                  CORRUPT <i>  -> CORRUPT ok <i> (damage page i: tests CHECK)
 *                  anything else-> ERR unknown
 *
 * The VM may be frozen for seconds and resumed elsewhere (that is the point):
 * nothing here assumes that time advances smoothly.  The writer caps how much
 * missed work it catches up on after a gap, and the heartbeat skips missed
 * beats instead of sending them in a burst.
 *
 * Threads: the heartbeat has its own thread so that neither the write loop
 * nor a long CHECK can delay it; the writer has its own thread; the main
 * thread reads commands.  A mutex (region_lock) makes a page's rewrite and
 * its generation bump atomic with respect to CHECK.  A second mutex
 * (tty_lock) keeps lines from the two talking threads whole.
 *
 * Built static (gcc -O2 -static -pthread) so the initramfs needs no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define PAGE_WORDS (PAGE_SIZE / 8u)
#define HDR_WORDS 3u /* index, generation, checksum */
#define STEP_NS 1000000ull          /* writer pacing step: 1 ms */
#define MAX_CATCHUP_NS 10000000ull  /* after a gap, catch up at most 10 ms of work */

/* ---- settings ---- */
static unsigned long cfg_mib = 64;
static double cfg_rate = 16.0; /* MiB/s; 0 = idle */
static unsigned long cfg_hb_ms = 10;
static char cfg_tty[128] = "/dev/ttyS1";

/* ---- state ---- */
static uint64_t *region;       /* npages * PAGE_WORDS words */
static uint32_t *gen;          /* per-page generation, in our own memory */
static size_t npages;
static pthread_mutex_t region_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t tty_lock = PTHREAD_MUTEX_INITIALIZER;
static int tty_fd = -1;
static uint64_t pages_written; /* total page rewrites, atomic access */
static uint64_t rate_bits;     /* current rate (double bits), atomic access */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { (time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static double get_rate(void)
{
    uint64_t b = __atomic_load_n(&rate_bits, __ATOMIC_RELAXED);
    double r;
    memcpy(&r, &b, sizeof r);
    return r;
}

static void set_rate(double r)
{
    uint64_t b;
    memcpy(&b, &r, sizeof b);
    __atomic_store_n(&rate_bits, b, __ATOMIC_RELAXED);
}

/* Write one whole line to the serial port (and never a partial one, even if
 * the port's buffer is full: loop on short writes).  Errors are ignored: the
 * workload must keep running even if nobody listens. */
static void tty_printf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    pthread_mutex_lock(&tty_lock);
    size_t off = 0;
    while (off < (size_t)n) {
        ssize_t w = write(tty_fd, buf + off, (size_t)n - off);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            break;
        }
        off += (size_t)w;
    }
    pthread_mutex_unlock(&tty_lock);
}

/* ---- page pattern ---- */

/* splitmix64: a good 64-bit mixer, used to seed each page's pattern. */
static inline uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The body word w of page (idx, g).  An xorshift stream seeded from
 * (idx, g), so any page content can be recomputed from its generation. */
static inline uint64_t seed_of(uint64_t idx, uint64_t g)
{
    uint64_t s = mix64((idx << 32) ^ g ^ 0x6c6976656d6967ull /* "livemig" */);
    return s ? s : 1;
}

static inline uint64_t xs_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Checksum of a page's body (words HDR_WORDS..end). */
static uint64_t body_sum(const uint64_t *p)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned w = HDR_WORDS; w < PAGE_WORDS; w++)
        h = (h ^ p[w]) * 0x100000001b3ull;
    return h;
}

/* Rewrite page idx with generation g.  Caller holds region_lock (or is the
 * only thread, during the initial fill). */
static void write_page(size_t idx, uint32_t g)
{
    uint64_t *p = region + idx * PAGE_WORDS;
    uint64_t s = seed_of(idx, g);
    for (unsigned w = HDR_WORDS; w < PAGE_WORDS; w++)
        p[w] = xs_next(&s);
    p[0] = idx;
    p[1] = g;
    p[2] = body_sum(p);
    gen[idx] = g;
}

/* True if page idx matches its recorded generation: header fields, body
 * pattern and stored checksum all agree.  Caller holds region_lock. */
static int page_ok(size_t idx)
{
    const uint64_t *p = region + idx * PAGE_WORDS;
    uint32_t g = gen[idx];
    if (p[0] != idx || p[1] != g)
        return 0;
    uint64_t s = seed_of(idx, g);
    for (unsigned w = HDR_WORDS; w < PAGE_WORDS; w++)
        if (p[w] != xs_next(&s))
            return 0;
    return p[2] == body_sum(p);
}

/* ---- threads ---- */

/* Heartbeat: absolute deadlines on CLOCK_MONOTONIC so the period does not
 * drift with the time spent writing; but if we are late by more than one
 * period (the VM was stopped, or the port was slow) we drop the missed beats
 * and restart the schedule from now, rather than sending a burst. */
static void *hb_thread(void *arg)
{
    (void)arg;
    uint64_t period = (uint64_t)cfg_hb_ms * 1000000ull;
    uint64_t seq = 0;
    uint64_t next = now_ns();
    for (;;) {
        tty_printf("HB %" PRIu64 " %" PRIu64 "\n", seq++,
                   __atomic_load_n(&pages_written, __ATOMIC_RELAXED));
        next += period;
        uint64_t t = now_ns();
        if (t > next + period)
            next = t + period; /* fell behind: skip, don't burst */
        struct timespec ts = { (time_t)(next / 1000000000ull), (long)(next % 1000000000ull) };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
    }
    return NULL;
}

/* Writer: every ~1 ms, earn a budget of pages proportional to the time that
 * really passed (rate * elapsed), but never more than MAX_CATCHUP_NS worth:
 * after a freeze of seconds the writer resumes at its normal rate instead of
 * rewriting the whole region at once.  The fractional remainder carries over
 * so low rates are exact on average. */
static void *writer_thread(void *arg)
{
    (void)arg;
    uint64_t rng = mix64(now_ns()) | 1;
    double budget = 0.0;
    uint64_t last = now_ns();
    for (;;) {
        sleep_ns(STEP_NS);
        uint64_t t = now_ns();
        uint64_t dt = t - last;
        last = t;
        if (dt > MAX_CATCHUP_NS)
            dt = MAX_CATCHUP_NS;
        double rate = get_rate();
        if (rate <= 0.0) {
            budget = 0.0;
            continue;
        }
        budget += rate * (1024.0 * 1024.0 / PAGE_SIZE) * (double)dt / 1e9;
        size_t n = (size_t)budget;
        if (n == 0)
            continue;
        budget -= (double)n;
        pthread_mutex_lock(&region_lock);
        for (size_t i = 0; i < n; i++) {
            size_t idx = (size_t)(xs_next(&rng) % npages);
            write_page(idx, gen[idx] + 1);
        }
        pthread_mutex_unlock(&region_lock);
        __atomic_add_fetch(&pages_written, n, __ATOMIC_RELAXED);
    }
    return NULL;
}

static void do_check(void)
{
    size_t bad = 0;
    long long first_bad = -1;
    /* Holding the lock for the whole scan pauses the writer (not the
     * heartbeat), so the scan sees every page with its own generation. */
    pthread_mutex_lock(&region_lock);
    for (size_t i = 0; i < npages; i++) {
        if (!page_ok(i)) {
            if (first_bad < 0)
                first_bad = (long long)i;
            bad++;
        }
    }
    pthread_mutex_unlock(&region_lock);
    tty_printf("CHECK ok pages=%zu bad=%zu first_bad=%lld\n", npages, bad, first_bad);
}

static void handle_line(char *line)
{
    /* strip trailing CR/space: a human at a terminal may send "\r\n" */
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\r' || line[n - 1] == ' '))
        line[--n] = 0;
    while (*line == ' ' || *line == '\r')
        line++;
    if (!*line)
        return;
    if (strcmp(line, "PING") == 0) {
        tty_printf("PONG\n");
    } else if (strcmp(line, "CHECK") == 0) {
        do_check();
    } else if (strncmp(line, "RATE ", 5) == 0) {
        double r = strtod(line + 5, NULL);
        if (r < 0)
            r = 0;
        set_rate(r);
        tty_printf("RATE ok %g\n", r);
    } else if (strncmp(line, "CORRUPT ", 8) == 0) {
        /* Test the tester: flip one body word of a page without bumping its
         * generation, so a following CHECK must report it. */
        size_t idx = (size_t)strtoull(line + 8, NULL, 10) % npages;
        pthread_mutex_lock(&region_lock);
        region[idx * PAGE_WORDS + PAGE_WORDS - 1] ^= 1;
        pthread_mutex_unlock(&region_lock);
        tty_printf("CORRUPT ok %zu\n", idx);
    } else {
        tty_printf("ERR unknown\n");
    }
}

/* ---- setup ---- */

static void apply_setting(const char *kv)
{
    const char *eq = strchr(kv, '=');
    if (!eq)
        return;
    size_t klen = (size_t)(eq - kv);
    const char *v = eq + 1;
    if (klen == 3 && strncmp(kv, "mib", 3) == 0)
        cfg_mib = strtoul(v, NULL, 10);
    else if (klen == 4 && strncmp(kv, "rate", 4) == 0)
        cfg_rate = strtod(v, NULL);
    else if (klen == 5 && strncmp(kv, "hb_ms", 5) == 0)
        cfg_hb_ms = strtoul(v, NULL, 10);
    else if (klen == 3 && strncmp(kv, "tty", 3) == 0)
        snprintf(cfg_tty, sizeof cfg_tty, "%s", v);
}

/* Take every "memwriter.KEY=VALUE" word from /proc/cmdline.  A missing
 * /proc/cmdline (running on a host without proc) just keeps the defaults. */
static void read_cmdline(void)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    char *save = NULL;
    for (char *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save))
        if (strncmp(w, "memwriter.", 10) == 0)
            apply_setting(w + 10);
}

/* Raw mode, 115200 baud (the fastest a standard 8250 port takes; QEMU does
 * not throttle to the baud rate anyway), no echo, no line discipline
 * processing, so what we write is exactly what the host reads. */
static int open_tty(const char *path)
{
    int fd = open(path, O_RDWR | O_NOCTTY);
    if (fd < 0)
        return -1;
    struct termios t;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        cfsetispeed(&t, B115200);
        cfsetospeed(&t, B115200);
        t.c_cflag |= CLOCAL | CREAD;
        t.c_cflag &= ~(tcflag_t)CRTSCTS;
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        tcsetattr(fd, TCSANOW, &t);
        tcflush(fd, TCIOFLUSH);
    }
    return fd;
}

int main(int argc, char **argv)
{
    read_cmdline();
    for (int i = 1; i < argc; i++)
        apply_setting(argv[i]);
    if (cfg_mib == 0)
        cfg_mib = 1;
    if (cfg_hb_ms == 0)
        cfg_hb_ms = 1;
    set_rate(cfg_rate);

    tty_fd = open_tty(cfg_tty);
    if (tty_fd < 0) {
        fprintf(stderr, "memwriter: cannot open %s: %s; using stdout\n", cfg_tty, strerror(errno));
        tty_fd = STDOUT_FILENO;
    }

    npages = (size_t)cfg_mib * (1024 * 1024 / PAGE_SIZE);
    region = mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    gen = calloc(npages, sizeof *gen);
    if (region == MAP_FAILED || !gen) {
        fprintf(stderr, "memwriter: cannot allocate %lu MiB\n", cfg_mib);
        tty_printf("ERR alloc mib=%lu\n", cfg_mib);
        for (;;)
            pause(); /* we are PID 1: exiting would panic the kernel */
    }
    /* Fill: this also touches every page, so the guest really owns them. */
    for (size_t i = 0; i < npages; i++)
        write_page(i, 0);

    fprintf(stderr, "memwriter: READY mib=%lu rate=%g hb_ms=%lu tty=%s\n", cfg_mib, cfg_rate,
            cfg_hb_ms, cfg_tty);
    tty_printf("READY mib=%lu rate=%g hb_ms=%lu pages=%zu\n", cfg_mib, cfg_rate, cfg_hb_ms,
               npages);

    pthread_t th;
    pthread_create(&th, NULL, hb_thread, NULL);
    pthread_create(&th, NULL, writer_thread, NULL);

    /* Main thread: read commands, one per line. */
    char line[256];
    size_t len = 0;
    for (;;) {
        char buf[256];
        ssize_t n = read(tty_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            sleep_ns(100000000ull); /* keep PID 1 alive even if the port fails */
            continue;
        }
        if (n == 0) {
            sleep_ns(10000000ull);
            continue;
        }
        for (ssize_t i = 0; i < n; i++) {
            char c = buf[i];
            if (c == '\n' || c == '\r') {
                line[len] = 0;
                handle_line(line);
                len = 0;
            } else if (len < sizeof line - 1) {
                line[len++] = c;
            }
        }
    }
}
