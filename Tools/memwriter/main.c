// memwriter: a workload for Ferry's tests and benchmarks.
//
// Allocates memory, optionally fills it with a verifiable pattern, and writes
// to it from T threads at a chosen rate, with optional mapping churn, heap
// growth, page zapping and shared/memfd regions. Written in C so that no
// language runtime (allocator, GC, reference counting) disturbs the timings
// the benchmarks measure.
//
// Protocol on stdout (line based, flushed):
//   region <name> 0x<start> 0x<end>     one per region, end exclusive
//   pid <PID> ready                     last line of the start-up block
//   sweep <pages> <nanoseconds>         answer to the stdin command "sweep"
//   touch <pages> <nanoseconds>         answer to "touch K" (every K-th page)
//   count <writes>                      answer to "count"
//   unmapped <P> <N>                    answer to "unmap P N" (pages of main)
//   peek <nonzero bytes>                answer to "peek 0xADDR" (loads that page)
//   done <writes>                       all writer threads reached --stop-after
// Commands on stdin, one per line: go, sweep, touch K, count, unmap P N, peek 0xADDR, quit. EOF on stdin is
// ignored (the process keeps running until killed), so it can run in the
// background of a shell.
//
// Write format (checkable in a memory image): a write to global page index P
// by thread T as its N-th write stores at the start of the page
//   word 0 = (T << 48) | N        word 1 = P | (1 << 63)
// With --pattern every 8-byte word at byte offset O of a region is first
// filled with O ^ key, key = 0x9E3779B97F4A7C15 * (seed + 1) (mod 2^64).
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <malloc.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WRITTEN_FLAG (1ULL << 63)
#define MAX_REGIONS 3
#define CHURN_SLOTS 8

struct region {
    const char *name;
    uint8_t *base;
    size_t pages;
};

static struct region regions[MAX_REGIONS];
static int region_count;
static size_t total_pages;

static unsigned long opt_mib = 64, opt_shared = 0, opt_memfd = 0, opt_threads = 1;
static unsigned long opt_rate = 0, opt_seed = 1, opt_stop_after = 0;
static unsigned long opt_sweep = 0, opt_heap_max = 64;
static int opt_heap_brk = 0;
static int opt_sweep_on = 0;
static int opt_huge = 0, opt_churn = 0, opt_heap_grow = 0, opt_zap = 0, opt_pattern = 0, opt_wait = 0, opt_no_write = 0;

static atomic_ulong total_writes;
static atomic_int writers_done;
static atomic_int go_flag;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    pthread_mutex_lock(&out_lock);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
}

static void usage(FILE *to) {
    fputs(
        "usage: memwriter [options]\n"
        "  --mib N           private anonymous region of N MiB (default 64)\n"
        "  --shared N        also a MAP_SHARED anonymous region of N MiB, written too\n"
        "  --memfd N         also a memfd region of N MiB (MAP_SHARED), written too\n"
        "  --threads T       random writer threads, 0 for none (default 1)\n"
        "  --rate W          writes per second per thread, 0 = as fast as possible (default 0)\n"
        "  --stop-after N    each thread stops after N writes; prints 'done <writes>'\n"
        "  --huge            ask for transparent huge pages on 'main' (MADV_HUGEPAGE)\n"
        "  --churn           a thread maps, writes and unmaps 1 MiB regions every 5 ms\n"
        "  --heap-grow       a thread grows the heap by 32 KiB every 5 ms (up to 64 MiB, then frees it)\n"
        "  --heap-max N      with --heap-grow: free the heap once it holds N MiB (default 64)\n"
        "  --heap-brk        with --heap-grow: grow the main heap (brk), which shrinks when\n"
        "                    freed, so its top vanishes and comes back at the same addresses\n"
        "                    (without it, the thread's own arena grows and never shrinks)\n"
        "  --zap             1 write in 16 first drops its page (madvise MADV_DONTNEED)\n"
        "  --sweep P         a thread rewrites every page of every region in order, over\n"
        "                    and over, P pages per second (0 = as fast as possible)\n"
        "  --pattern         fill every region with a checkable pattern before 'ready'\n"
        "  --seed S          random seed and pattern key (default 1)\n"
        "  --wait            start writing only after the stdin command 'go'\n"
        "  --no-write        start no writer threads (use stdin 'sweep' to write)\n"
        "  --help            this text\n"
        "stdout: 'region <name> 0x<start> 0x<end>' lines, then 'pid <PID> ready'.\n"
        "stdin commands: go | sweep (write one word per page of 'main', prints\n"
        "'sweep <pages> <ns>') | touch K (the same on every K-th page, prints\n"
        "'touch <pages> <ns>') | count (prints 'count <writes>') | unmap P N (munmap\n"
        "N pages of 'main' from page P; prints 'unmapped P N') | quit.\n"
        "A write to global page P stores word0 = (thread << 48) | n, word1 = P | 1<<63.\n"
        "--pattern word at region offset O = O ^ (0x9E3779B97F4A7C15 * (seed + 1)).\n",
        to);
}

static unsigned long parse_number(const char *option, const char *value) {
    if (!value) {
        fprintf(stderr, "memwriter: %s needs a number\n", option);
        exit(2);
    }
    char *end;
    errno = 0;
    unsigned long n = strtoul(value, &end, 10);
    if (errno || *end || *value == '-') {
        fprintf(stderr, "memwriter: %s: '%s' is not a non-negative number\n", option, value);
        exit(2);
    }
    return n;
}

static void on_term(int sig) {
    (void)sig;
    static const char text[] = "memwriter: terminated\n";
    ssize_t ignored = write(STDERR_FILENO, text, sizeof text - 1);
    (void)ignored;
    _exit(0);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void *map_region(const char *name, size_t mib, int flags, int fd) {
    size_t bytes = mib << 20;
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "memwriter: cannot map %zu MiB for %s: %s\n", mib, name, strerror(errno));
        exit(1);
    }
    regions[region_count].name = name;
    regions[region_count].base = p;
    regions[region_count].pages = bytes / PAGE;
    region_count++;
    total_pages += bytes / PAGE;
    return p;
}

static uint8_t *page_address(size_t global) {
    for (int i = 0; i < region_count; i++) {
        if (global < regions[i].pages) return regions[i].base + global * PAGE;
        global -= regions[i].pages;
    }
    return NULL;
}

static void fill_pattern(void) {
    uint64_t key = 0x9E3779B97F4A7C15ULL * (opt_seed + 1);
    for (int r = 0; r < region_count; r++) {
        uint64_t *words = (uint64_t *)regions[r].base;
        size_t count = regions[r].pages * PAGE / 8;
        for (size_t i = 0; i < count; i++) words[i] = (i * 8) ^ key;
    }
}

static void pace(uint64_t *deadline, unsigned long rate) {
    // Sleep in steps of at least 1 ms so high rates do not become syscall storms.
    uint64_t step = 1000000000ULL / rate;
    *deadline += step;
    uint64_t now = now_ns();
    if (*deadline > now + 1000000ULL || (*deadline > now && step >= 1000000ULL)) {
        struct timespec ts = {(time_t)(*deadline / 1000000000ULL), (long)(*deadline % 1000000000ULL)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
    } else if (now > *deadline + 100000000ULL) {
        *deadline = now; // fell far behind (stopped, frozen): do not burst to catch up
    }
}

static void *writer(void *arg) {
    uint64_t thread = (uint64_t)(uintptr_t)arg;
    uint64_t state = 0x2545F4914F6CDD1DULL ^ (opt_seed * 0x100000001B3ULL) ^ ((thread + 1) << 32);
    if (state == 0) state = 1;
    uint64_t deadline = now_ns();
    uint64_t n = 0;
    for (;;) {
        if (opt_stop_after && n >= opt_stop_after) break;
        size_t page = (size_t)(xorshift(&state) % total_pages);
        uint8_t *p = page_address(page);
        if (opt_zap && (xorshift(&state) & 15) == 0) madvise(p, PAGE, MADV_DONTNEED);
        n++;
        volatile uint64_t *words = (volatile uint64_t *)p;
        words[0] = (thread << 48) | n;
        words[1] = (uint64_t)page | WRITTEN_FLAG;
        atomic_fetch_add_explicit(&total_writes, 1, memory_order_relaxed);
        if (opt_rate) pace(&deadline, opt_rate);
    }
    if ((unsigned long)atomic_fetch_add(&writers_done, 1) + 1 == opt_threads)
        say("done %lu\n", atomic_load(&total_writes));
    return NULL;
}

static void *churner(void *arg) {
    (void)arg;
    uint8_t *slots[CHURN_SLOTS] = {0};
    unsigned i = 0;
    for (;;) {
        unsigned slot = i++ % CHURN_SLOTS;
        if (slots[slot]) munmap(slots[slot], 1 << 20);
        void *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        slots[slot] = p == MAP_FAILED ? NULL : p;
        if (slots[slot])
            for (size_t o = 0; o < (1 << 20); o += PAGE) slots[slot][o] = (uint8_t)i;
        usleep(5000);
    }
    return NULL;
}

static void *sweeper(void *arg) {
    (void)arg;
    // Word 2 of each page, in address order, region after region: the write
    // pattern of a scan or a copying collector, which keeps a moving band of
    // pages dirty instead of scattering writes.
    uint64_t deadline = now_ns();
    for (uint64_t pass = 1;; pass++) {
        for (size_t page = 0; page < total_pages; page++) {
            ((volatile uint64_t *)page_address(page))[2] = pass;
            if (opt_sweep) pace(&deadline, opt_sweep);
        }
    }
    return NULL;
}

#define HEAP_CHUNKS 2048 /* 2048 x 32 KiB = 64 MiB (the most --heap-max allows), then the heap is freed and grows again */
static void *heap_grower(void *arg) {
    (void)arg;
    static uint8_t *chunks[HEAP_CHUNKS];
    // 32 KiB stays below malloc's mmap threshold, so chunks come from an arena's heap.
    for (unsigned i = 0;; i++) {
        unsigned slot = i % (unsigned)(opt_heap_max * 32);
        if (slot == 0 && chunks[0]) {
            for (unsigned k = 0; k < HEAP_CHUNKS; k++) { free(chunks[k]); chunks[k] = NULL; }
            // Shrinks the brk heap (main arena) or releases pages of a thread arena.
            malloc_trim(0);
        }
        chunks[slot] = malloc(32 << 10);
        if (chunks[slot]) memset(chunks[slot], (int)(i | 1), 32 << 10);
        usleep(5000);
    }
    return NULL;
}

static void start_thread(void *(*fn)(void *), void *arg) {
    pthread_t t;
    int rc = pthread_create(&t, NULL, fn, arg);
    if (rc) {
        fprintf(stderr, "memwriter: cannot start a thread: %s\n", strerror(rc));
        exit(1);
    }
    pthread_detach(t);
}

static void start_writers(void) {
    if (atomic_exchange(&go_flag, 1)) return;
    if (opt_no_write) return;
    for (unsigned long t = 0; t < opt_threads; t++) start_thread(writer, (void *)(uintptr_t)t);
    if (opt_churn) start_thread(churner, NULL);
    if (opt_heap_grow) start_thread(heap_grower, NULL);
    if (opt_sweep_on) start_thread(sweeper, NULL);
}

static void touch(const char *command, size_t step) {
    // One write to every step-th page of the main region, timed: the
    // benchmark's per-first-write cost (step 1) and its dirty fractions.
    struct region *r = &regions[0];
    if (step == 0) step = 1;
    size_t pages = 0;
    uint64_t start = now_ns();
    for (size_t i = 0; i < r->pages; i += step, pages++) ((volatile uint64_t *)(r->base + i * PAGE))[2] += 1;
    uint64_t elapsed = now_ns() - start;
    say("%s %zu %" PRIu64 "\n", command, pages, elapsed);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--mib")) { opt_mib = parse_number(a, v); i++; }
        else if (!strcmp(a, "--shared")) { opt_shared = parse_number(a, v); i++; }
        else if (!strcmp(a, "--memfd")) { opt_memfd = parse_number(a, v); i++; }
        else if (!strcmp(a, "--threads")) { opt_threads = parse_number(a, v); i++; }
        else if (!strcmp(a, "--rate")) { opt_rate = parse_number(a, v); i++; }
        else if (!strcmp(a, "--stop-after")) { opt_stop_after = parse_number(a, v); i++; }
        else if (!strcmp(a, "--seed")) { opt_seed = parse_number(a, v); i++; }
        else if (!strcmp(a, "--churn")) opt_churn = 1;
        else if (!strcmp(a, "--sweep")) { opt_sweep = parse_number(a, v); opt_sweep_on = 1; i++; }
        else if (!strcmp(a, "--huge")) opt_huge = 1;
        else if (!strcmp(a, "--heap-grow")) opt_heap_grow = 1;
        else if (!strcmp(a, "--heap-max")) { opt_heap_max = parse_number(a, v); i++; }
        else if (!strcmp(a, "--heap-brk")) opt_heap_brk = 1;
        else if (!strcmp(a, "--zap")) opt_zap = 1;
        else if (!strcmp(a, "--pattern")) opt_pattern = 1;
        else if (!strcmp(a, "--wait")) opt_wait = 1;
        else if (!strcmp(a, "--no-write")) opt_no_write = 1;
        else {
            fprintf(stderr, "memwriter: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (opt_mib == 0) { fprintf(stderr, "memwriter: --mib must be at least 1\n"); return 2; }
    if (opt_heap_max == 0 || opt_heap_max > 64) { fprintf(stderr, "memwriter: --heap-max must be 1..64\n"); return 2; }
    // One arena for every thread: the heap grower's chunks come from brk.
    if (opt_heap_brk) mallopt(M_ARENA_MAX, 1);
    if (opt_threads > 256) { fprintf(stderr, "memwriter: --threads must be 0..256 (0: no random writers)\n"); return 2; }

    // A parent may have spawned us with signals blocked: unblock the ones we handle.
    sigset_t handled;
    sigemptyset(&handled);
    sigaddset(&handled, SIGTERM);
    sigaddset(&handled, SIGINT);
    sigprocmask(SIG_UNBLOCK, &handled, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    void *main_base = map_region("main", opt_mib, MAP_PRIVATE | MAP_ANONYMOUS, -1);
    // THP is "madvise" on our machines: 4 KiB pages unless asked for.
    madvise(main_base, opt_mib << 20, opt_huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    if (opt_shared) map_region("shared", opt_shared, MAP_SHARED | MAP_ANONYMOUS, -1);
    if (opt_memfd) {
        int fd = memfd_create("memwriter", MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)(opt_memfd << 20)) != 0) {
            fprintf(stderr, "memwriter: cannot create a %lu MiB memfd: %s\n", opt_memfd, strerror(errno));
            return 1;
        }
        map_region("memfd", opt_memfd, MAP_SHARED, fd);
        close(fd);
    }
    // Populate every page so the regions are resident before anyone tracks them.
    if (opt_pattern) fill_pattern();
    else for (int r = 0; r < region_count; r++) memset(regions[r].base, 0, regions[r].pages * PAGE);

    for (int r = 0; r < region_count; r++)
        say("region %s 0x%" PRIxPTR " 0x%" PRIxPTR "\n", regions[r].name, (uintptr_t)regions[r].base,
            (uintptr_t)(regions[r].base + regions[r].pages * PAGE));
    say("pid %d ready\n", (int)getpid());

    if (!opt_wait) start_writers();

    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "go", 2)) start_writers();
        else if (!strncmp(line, "sweep", 5)) touch("sweep", 1);
        else if (!strncmp(line, "touch ", 6)) touch("touch", (size_t)strtoul(line + 6, NULL, 10));
        else if (!strncmp(line, "count", 5)) say("count %lu\n", atomic_load(&total_writes));
        else if (!strncmp(line, "unmap ", 6)) {
            // unmap P N: munmap N pages of main from page P (tests of vanished pages).
            char *end;
            size_t first = strtoul(line + 6, &end, 10), count = strtoul(end, NULL, 10);
            if (first + count > regions[0].pages || count == 0 || munmap(regions[0].base + first * PAGE, count * PAGE) != 0)
                say("unmap failed\n");
            else
                say("unmapped %zu %zu\n", first, count);
        }
        else if (!strncmp(line, "peek ", 5)) {
            // peek 0xADDR: load the page at ADDR (any mapping: migrated memory
            // placed here by a leecher) and say how many of its bytes are not zero.
            const volatile unsigned char *page = (const volatile unsigned char *)(strtoul(line + 5, NULL, 16) & ~(uintptr_t)(PAGE - 1));
            size_t nonzero = 0;
            for (size_t i = 0; i < PAGE; i++) nonzero += page[i] != 0;
            say("peek %zu\n", nonzero);
        }
        else if (!strncmp(line, "quit", 4)) _exit(0);
    }
    // stdin closed: keep running until a signal ends us.
    for (;;) pause();
}
