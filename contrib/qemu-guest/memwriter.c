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
 *   4. With memwriter.disk_mib=N, it does to the first N MiB of a disk
 *      (memwriter.disk_dev, /dev/vda) what it does to memory: each 4 KiB
 *      block it writes holds (index, generation, checksum) and a body
 *      derived from them, written with O_DIRECT (straight to the VMM, no
 *      guest page cache) at memwriter.disk_rate MiB/s; the generations live
 *      in guest RAM.  A block never written reads as zeros.  DCHECK reads the
 *      disk back (O_DIRECT) and compares every block with its generation, so
 *      a migration that lost a write the guest saw complete (one QEMU had not
 *      flushed at the pause, or livemig had not sent) shows up as bad.
 *
 * Settings come from the kernel command line (memwriter.mib=64
 * memwriter.rate=16 memwriter.hb_ms=1 memwriter.tty=/dev/ttyS1), read from
 * /proc/cmdline, and may be overridden by argv in the same key=value form
 * (mib=64 rate=16 ...), which makes the program testable on the host too.
 *
 * Serial protocol (one line each, '\n' terminated):
 *   guest -> host: READY mib=<n> rate=<r> hb_ms=<h> pages=<p> disk_blocks=<b>
 *                  HB <seq> <pages_written_total> <disk_blocks_written_total>
 *   host -> guest: PING         -> PONG
 *                  CHECK        -> CHECK ok pages=<n> bad=<k> first_bad=<i|-1>
 *                                  ("ok" means the scan ran; the verdict is bad=)
 *                  RATE <r>     -> RATE ok <r>   (change the dirty rate)
 *                  CORRUPT <i>  -> CORRUPT ok <i> (damage page i: tests CHECK)
 *                  DCHECK       -> DCHECK ok blocks=<n> written=<w> bad=<k>
 *                                  first_bad=<i|-1> errors=<e>  (or DCHECK none)
 *                  DRATE <r>    -> DRATE ok <r>  (change the disk write rate)
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
#include <linux/fs.h>
#include <sys/ioctl.h>
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
static unsigned long cfg_disk_mib = 0; /* 0: no disk */
static double cfg_disk_rate = 1.0;    /* MiB/s */
static char cfg_disk_dev[128] = "/dev/vda";

/* ---- state ---- */
static uint64_t *region;       /* npages * PAGE_WORDS words */
static uint32_t *gen;          /* per-page generation, in our own memory */
static size_t npages;
static pthread_mutex_t region_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t tty_lock = PTHREAD_MUTEX_INITIALIZER;
static int tty_fd = -1;
static uint64_t pages_written; /* total page rewrites, atomic access */
static uint64_t rate_bits;     /* current rate (double bits), atomic access */

/* the disk: per-block generations in our memory (0: never written, zeros) */
static int disk_fd = -1;
static uint32_t *dgen;
static size_t dblocks;
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t disk_written;   /* total block writes, atomic access */
static uint64_t disk_errors;    /* writes that failed, atomic access */
static uint64_t disk_rate_bits; /* current disk rate (double bits), atomic access */

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

static double load_rate(const uint64_t *bits)
{
    uint64_t b = __atomic_load_n(bits, __ATOMIC_RELAXED);
    double r;
    memcpy(&r, &b, sizeof r);
    return r;
}

static void store_rate(uint64_t *bits, double r)
{
    uint64_t b;
    memcpy(&b, &r, sizeof b);
    __atomic_store_n(bits, b, __ATOMIC_RELAXED);
}

static double get_rate(void)
{
    return load_rate(&rate_bits);
}

static void set_rate(double r)
{
    store_rate(&rate_bits, r);
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

/* ---- disk blocks: the same pattern as pages, salted so a page never passes for a block ---- */

#define DISK_SALT (1ull << 48)
#define DCHECK_CHUNK 64u /* blocks read at once by DCHECK */

/* Block idx with generation g > 0. */
static void fill_block(uint64_t *p, size_t idx, uint32_t g)
{
    uint64_t s = seed_of((uint64_t)idx | DISK_SALT, g);
    for (unsigned w = HDR_WORDS; w < PAGE_WORDS; w++)
        p[w] = xs_next(&s);
    p[0] = idx;
    p[1] = g;
    p[2] = body_sum(p);
}

/* True if the block read at p is block idx at generation g (zeros for 0). */
static int block_ok(const uint64_t *p, size_t idx, uint32_t g)
{
    if (g == 0) {
        for (unsigned w = 0; w < PAGE_WORDS; w++)
            if (p[w])
                return 0;
        return 1;
    }
    if (p[0] != idx || p[1] != g)
        return 0;
    uint64_t s = seed_of((uint64_t)idx | DISK_SALT, g);
    for (unsigned w = HDR_WORDS; w < PAGE_WORDS; w++)
        if (p[w] != xs_next(&s))
            return 0;
    return p[2] == body_sum(p);
}

/* ---- threads ---- */

/* A pacer earns rate MiB/s of 4 KiB units from the time that really passed
 * since its last step, at most MAX_CATCHUP_NS worth after a gap (the VM was
 * frozen for seconds: resume at the normal rate, do not catch up in a burst).
 * The fractional remainder carries over so low rates are exact on average. */
struct pacer {
    double budget;
    uint64_t last;
};

static size_t pacer_step(struct pacer *pc, double rate)
{
    uint64_t t = now_ns();
    uint64_t dt = t - pc->last;
    pc->last = t;
    if (dt > MAX_CATCHUP_NS)
        dt = MAX_CATCHUP_NS;
    if (rate <= 0.0) {
        pc->budget = 0.0;
        return 0;
    }
    pc->budget += rate * (1024.0 * 1024.0 / PAGE_SIZE) * (double)dt / 1e9;
    size_t n = (size_t)pc->budget;
    pc->budget -= (double)n;
    return n;
}

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
        tty_printf("HB %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", seq++,
                   __atomic_load_n(&pages_written, __ATOMIC_RELAXED),
                   __atomic_load_n(&disk_written, __ATOMIC_RELAXED));
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

/* Writer: every ~1 ms, rewrite the pages its pacer earned. */
static void *writer_thread(void *arg)
{
    (void)arg;
    uint64_t rng = mix64(now_ns()) | 1;
    struct pacer pc = { 0.0, now_ns() };
    for (;;) {
        sleep_ns(STEP_NS);
        size_t n = pacer_step(&pc, get_rate());
        if (n == 0)
            continue;
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

/* Disk writer: every ~1 ms, the blocks its pacer earned, each written
 * (O_DIRECT, so it reaches the VMM before pwrite returns) and then recorded,
 * both under disk_lock: DCHECK never runs with a write in flight, and a write
 * the VM was stopped in completes (at the destination) before a DCHECK. */
static void *disk_writer_thread(void *arg)
{
    (void)arg;
    uint64_t rng = mix64(now_ns() ^ 0x6469736bull) | 1;
    struct pacer pc = { 0.0, now_ns() };
    uint64_t *buf;
    if (posix_memalign((void **)&buf, PAGE_SIZE, PAGE_SIZE) != 0)
        return NULL;
    for (;;) {
        sleep_ns(STEP_NS);
        size_t n = pacer_step(&pc, load_rate(&disk_rate_bits));
        for (size_t i = 0; i < n; i++) {
            size_t idx = (size_t)(xs_next(&rng) % dblocks);
            pthread_mutex_lock(&disk_lock);
            uint32_t g = dgen[idx] + 1;
            fill_block(buf, idx, g);
            if (pwrite(disk_fd, buf, PAGE_SIZE, (off_t)idx * PAGE_SIZE) == (ssize_t)PAGE_SIZE) {
                dgen[idx] = g;
                __atomic_add_fetch(&disk_written, 1, __ATOMIC_RELAXED);
            } else {
                __atomic_add_fetch(&disk_errors, 1, __ATOMIC_RELAXED);
            }
            pthread_mutex_unlock(&disk_lock);
        }
    }
    return NULL;
}

/* Read the disk back (O_DIRECT: what the VMM's image holds, not a cache of
 * ours) and compare every block with its generation. */
static void do_dcheck(void)
{
    static uint64_t *buf;
    if (disk_fd < 0) {
        tty_printf("DCHECK none\n");
        return;
    }
    if (!buf && posix_memalign((void **)&buf, PAGE_SIZE, DCHECK_CHUNK * PAGE_SIZE) != 0) {
        tty_printf("ERR dcheck alloc\n");
        return;
    }
    size_t bad = 0, written = 0;
    long long first_bad = -1;
    pthread_mutex_lock(&disk_lock);
    for (size_t at = 0; at < dblocks; at += DCHECK_CHUNK) {
        size_t n = dblocks - at < DCHECK_CHUNK ? dblocks - at : DCHECK_CHUNK;
        ssize_t got = pread(disk_fd, buf, n * PAGE_SIZE, (off_t)at * PAGE_SIZE);
        for (size_t i = 0; i < n; i++) {
            size_t idx = at + i;
            written += dgen[idx] != 0;
            if (got != (ssize_t)(n * PAGE_SIZE) || !block_ok(buf + i * PAGE_WORDS, idx, dgen[idx])) {
                if (first_bad < 0)
                    first_bad = (long long)idx;
                bad++;
            }
        }
    }
    pthread_mutex_unlock(&disk_lock);
    tty_printf("DCHECK ok blocks=%zu written=%zu bad=%zu first_bad=%lld errors=%" PRIu64 "\n", dblocks,
               written, bad, first_bad, __atomic_load_n(&disk_errors, __ATOMIC_RELAXED));
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
    } else if (strcmp(line, "DCHECK") == 0) {
        do_dcheck();
    } else if (strncmp(line, "DRATE ", 6) == 0) {
        double r = strtod(line + 6, NULL);
        if (r < 0)
            r = 0;
        store_rate(&disk_rate_bits, r);
        tty_printf("DRATE ok %g\n", r);
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
    else if (klen == 8 && strncmp(kv, "disk_mib", 8) == 0)
        cfg_disk_mib = strtoul(v, NULL, 10);
    else if (klen == 9 && strncmp(kv, "disk_rate", 9) == 0)
        cfg_disk_rate = strtod(v, NULL);
    else if (klen == 8 && strncmp(kv, "disk_dev", 8) == 0)
        snprintf(cfg_disk_dev, sizeof cfg_disk_dev, "%s", v);
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

/* The disk, opened for O_DIRECT I/O once its driver made the node (the
 * module's probe may still be running when /init execs us: wait up to 10 s).
 * Returns an error text, or NULL. */
static const char *open_disk(void)
{
    static char why[192];
    for (int tries = 0; (disk_fd = open(cfg_disk_dev, O_RDWR | O_DIRECT)) < 0 && tries < 100; tries++)
        sleep_ns(100000000ull);
    if (disk_fd < 0) {
        snprintf(why, sizeof why, "open %s: %s", cfg_disk_dev, strerror(errno));
        return why;
    }
    uint64_t bytes = 0;
    dblocks = (size_t)cfg_disk_mib * (1024 * 1024 / PAGE_SIZE);
    if (ioctl(disk_fd, BLKGETSIZE64, &bytes) != 0 || bytes < (uint64_t)dblocks * PAGE_SIZE) {
        snprintf(why, sizeof why, "%s holds %" PRIu64 " bytes, fewer than disk_mib=%lu", cfg_disk_dev, bytes, cfg_disk_mib);
        close(disk_fd);
        disk_fd = -1;
        dblocks = 0;
        return why;
    }
    dgen = calloc(dblocks, sizeof *dgen);
    if (!dgen) {
        close(disk_fd);
        disk_fd = -1;
        dblocks = 0;
        return "no memory for the block generations";
    }
    return NULL;
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
    store_rate(&disk_rate_bits, cfg_disk_rate);

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

    if (cfg_disk_mib) {
        const char *why = open_disk();
        if (why) {
            fprintf(stderr, "memwriter: disk: %s\n", why);
            tty_printf("ERR disk %s\n", why);
        }
    }

    fprintf(stderr, "memwriter: READY mib=%lu rate=%g hb_ms=%lu tty=%s\n", cfg_mib, cfg_rate,
            cfg_hb_ms, cfg_tty);
    tty_printf("READY mib=%lu rate=%g hb_ms=%lu pages=%zu disk_blocks=%zu\n", cfg_mib, cfg_rate,
               cfg_hb_ms, npages, dblocks);

    pthread_t th;
    pthread_create(&th, NULL, hb_thread, NULL);
    pthread_create(&th, NULL, writer_thread, NULL);
    if (disk_fd >= 0)
        pthread_create(&th, NULL, disk_writer_thread, NULL);

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
