// The process the CRIU migration tests and benchmark move (issue 13).
//
//   workload MIB RATE LOG [PORT [THREADS]]
//
// MIB of private anonymous memory, filled with random words, written at RATE
// random 8-byte writes a second in all (0: none; -1: as fast as it can) by
// THREADS writer threads (default 4). Each thread owns the pages p with
// p % THREADS == its index, and for each of them keeps in a ledger (itself in
// migrated memory) the xor of the page's words, and in word 0 of the page a
// count of writes to it; it also counts its own writes. A check (SIGUSR1)
// pauses the writers and recomputes all of it: a page lost, zero-filled or
// stale, or a ledger page out of step with its pages, fails the check,
// while a process whose every byte matches the frozen source passes.
//
// It also holds an open file (LOG, appended to) and a listening TCP socket
// on 127.0.0.1:PORT (default 0: any port), and a timing thread reads
// CLOCK_REALTIME every millisecond and keeps the largest gap it saw: the
// downtime the application observed (CRIU restores into a new time namespace,
// so CLOCK_MONOTONIC would hide the gap). Once a second it appends a count to
// LOG ("tick N"). Each check appends one line to LOG:
//   check ok pages=P writes=W maxgap_us=G ticks=N listen=PORT file=ok
//   check FAILED page=P ...
// SIGUSR2 resets the largest gap. Standard streams should not be inherited
// pipes (CRIU would need them on restore): the program points them at
// /dev/null and closes every other inherited descriptor.
//
// With WORKLOAD_ALIGNED_SP=1 in the environment, the main thread waits for
// signals with its stack pointer on a page boundary (x86-64 only). CRIU
// 4.2.1's lazy dump then writes every page into its images instead of
// leaving them lazy (criu/mem.c is_stack() tests `(sp ^ vaddr) & ~PAGE_MASK`,
// true for every page when some thread's sp is page aligned): the condition
// a process meets by chance, 1 dump in 256 for a thread whose stack is
// randomized, made certain for the tests of Ferry's handling of it.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t *memory;
static uint64_t *ledger;
static size_t pages;
static int threads = 4;
static long rate;
static int log_fd = -1, listen_fd = -1, listen_port;
static pthread_rwlock_t pause_lock;
static _Atomic uint64_t *thread_writes;
static _Atomic uint64_t max_gap_ns;
static _Atomic uint64_t ticks;
static volatile sig_atomic_t check_wanted, reset_wanted;

static uint64_t next_random(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static uint64_t now_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void say(const char *line) {
    if (write(log_fd, line, strlen(line)) < 0) { /* nothing to do */ }
}

static void *writer(void *arg) {
    long index = (long)arg;
    uint64_t seed = 0x9e3779b97f4a7c15ull * (uint64_t)(index + 1);
    size_t owned = (pages + threads - 1 - index) / threads;
    if (owned == 0) return NULL;
    // Writes come in bursts of at most 1 ms worth, each under the pause lock.
    double per_thread = rate > 0 ? (double)rate / threads : 0;
    uint64_t started = now_ns(CLOCK_MONOTONIC), done = 0;
    for (;;) {
        long burst = 1024;
        if (rate == 0) { sleep(1); continue; }
        if (rate > 0) {
            uint64_t due = (uint64_t)((now_ns(CLOCK_MONOTONIC) - started) / 1e9 * per_thread);
            if (due <= done) {
                struct timespec t = { 0, 500000 };
                nanosleep(&t, NULL);
                continue;
            }
            burst = (long)(due - done);
            if (burst > 65536) burst = 65536;
        }
        pthread_rwlock_rdlock(&pause_lock);
        for (long i = 0; i < burst; i++) {
            size_t p = (size_t)(next_random(&seed) % owned) * threads + index;
            size_t w = 1 + next_random(&seed) % (WORDS - 1);
            uint64_t *page = memory + p * WORDS;
            uint64_t value = next_random(&seed);
            uint64_t count = page[0];
            ledger[p] ^= page[w] ^ value ^ count ^ (count + 1);
            page[w] = value;
            page[0] = count + 1;
        }
        thread_writes[index] += (uint64_t)burst;
        pthread_rwlock_unlock(&pause_lock);
        done += (uint64_t)burst;
    }
    return NULL;
}

static void *timer(void *arg) {
    (void)arg;
    uint64_t last = now_ns(CLOCK_REALTIME), last_tick = last;
    for (;;) {
        struct timespec t = { 0, 1000000 };
        nanosleep(&t, NULL);
        uint64_t now = now_ns(CLOCK_REALTIME);
        if (reset_wanted) { reset_wanted = 0; max_gap_ns = 0; }
        else if (now > last && now - last > max_gap_ns) max_gap_ns = now - last;
        last = now;
        if (now - last_tick >= 1000000000ull) {
            last_tick = now;
            char line[64];
            snprintf(line, sizeof line, "tick %llu\n", (unsigned long long)++ticks);
            say(line);
        }
    }
    return NULL;
}

static void check(void) {
    char line[256];
    pthread_rwlock_wrlock(&pause_lock);
    uint64_t counted = 0, writes = 0;
    long bad = -1;
    for (size_t p = 0; p < pages; p++) {
        uint64_t x = 0, *page = memory + p * WORDS;
        for (int w = 0; w < WORDS; w++) x ^= page[w];
        if (x != ledger[p]) { bad = (long)p; break; }
        counted += page[0];
    }
    for (int i = 0; i < threads; i++) writes += thread_writes[i];
    pthread_rwlock_unlock(&pause_lock);
    // The socket: still listening (accept finds nobody, not EBADF/EINVAL).
    int listening = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
    struct stat st;
    int file_ok = fstat(log_fd, &st) == 0 && S_ISREG(st.st_mode);
    if (bad >= 0)
        snprintf(line, sizeof line, "check FAILED page=%ld (xor of its words differs from the ledger)\n", bad);
    else if (counted != writes)
        snprintf(line, sizeof line, "check FAILED writes: pages count %llu, threads count %llu\n",
                 (unsigned long long)counted, (unsigned long long)writes);
    else if (!listening || !file_ok)
        snprintf(line, sizeof line, "check FAILED listen=%d file=%d\n", listening, file_ok);
    else
        snprintf(line, sizeof line, "check ok pages=%zu writes=%llu maxgap_us=%llu ticks=%llu listen=%d file=ok\n",
                 pages, (unsigned long long)writes, (unsigned long long)(max_gap_ns / 1000),
                 (unsigned long long)ticks, listen_port);
    say(line);
}

static void on_signal(int signal) {
    if (signal == SIGUSR1) check_wanted = 1;
    else reset_wanted = 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: workload MIB RATE LOG [PORT [THREADS]]\n");
        return 2;
    }
    size_t mib = strtoull(argv[1], NULL, 10);
    rate = strtol(argv[2], NULL, 10);
    int port = argc > 4 ? atoi(argv[4]) : 0;
    if (argc > 5) threads = atoi(argv[5]);
    if (threads < 1 || threads > 64) threads = 4;
    // Close what was inherited: CRIU would have to find it again on restore.
    DIR *fds = opendir("/proc/self/fd");
    if (fds) {
        int keep = dirfd(fds);
        struct dirent *e;
        while ((e = readdir(fds))) {
            int fd = atoi(e->d_name);
            if (fd > 2 && fd != keep) close(fd);
        }
        closedir(fds);
    }
    // Its own session: CRIU then needs no --shell-job.
    setsid();
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    if (null > 2) close(null);
    log_fd = open(argv[3], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) return 3;
    listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_in address = { .sin_family = AF_INET, .sin_port = htons(port),
                                   .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t length = sizeof address;
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listen_fd, (struct sockaddr *)&address, sizeof address) || listen(listen_fd, 16) ||
        getsockname(listen_fd, (struct sockaddr *)&address, &length)) {
        say("cannot listen\n");
        return 4;
    }
    listen_port = ntohs(address.sin_port);
    pages = mib * 1024 * 1024 / PAGE;
    memory = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ledger = mmap(NULL, pages * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    thread_writes = calloc(threads, sizeof *thread_writes);
    if (memory == MAP_FAILED || ledger == MAP_FAILED || !thread_writes) return 5;
    uint64_t seed = 0x243f6a8885a308d3ull ^ (uint64_t)getpid();
    for (size_t p = 0; p < pages; p++) {
        uint64_t x = 0, *page = memory + p * WORDS;
        page[0] = 0;
        for (int w = 1; w < WORDS; w++) x ^= (page[w] = next_random(&seed));
        ledger[p] = x;
    }
    // Writers take the lock shared all the time: the check must not starve.
    pthread_rwlockattr_t kind;
    pthread_rwlockattr_init(&kind);
    pthread_rwlockattr_setkind_np(&kind, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&pause_lock, &kind);
    struct sigaction action = { .sa_handler = on_signal };
    sigaction(SIGUSR1, &action, NULL);
    sigaction(SIGUSR2, &action, NULL);
    // Only the main thread takes the signals: it waits for them in pause().
    sigset_t mask, old;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &mask, &old);
    pthread_t thread;
    for (long i = 0; i < threads; i++) pthread_create(&thread, NULL, writer, (void *)i);
    pthread_create(&thread, NULL, timer, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    char line[128];
    snprintf(line, sizeof line, "ready pid=%d pages=%zu listen=%d\n", getpid(), pages, listen_port);
    say(line);
    char *aligned_sp = NULL;
#if defined(__x86_64__)
    const char *want_aligned = getenv("WORKLOAD_ALIGNED_SP");
    if (want_aligned && strcmp(want_aligned, "1") == 0) {
        // A stack of its own for the wait (signal frames go below it).
        char *stack = mmap(NULL, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (stack == MAP_FAILED) return 6;
        memset(stack, 0, 1 << 16);
        aligned_sp = stack + (1 << 15);
    }
#endif
    for (;;) {
#if defined(__x86_64__)
        if (aligned_sp) {
            long ret;
            __asm__ volatile("mov %%rsp, %%r12\n\tmov %1, %%rsp\n\tmov $34, %%eax\n\tsyscall\n\tmov %%r12, %%rsp"
                             : "=a"(ret) : "r"(aligned_sp) : "r12", "rcx", "r11", "memory");
            (void)ret;
        } else
#endif
            pause();
        if (check_wanted) { check_wanted = 0; check(); }
    }
}
