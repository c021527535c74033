// deadleader: a process whose main thread has exited while its other threads
// run on (issue 15, class 4). Some runtimes and launchers do this: the main
// thread sets things up, starts workers and calls pthread_exit. The
// thread-group leader is then a zombie until the last thread ends, and every
// per-process /proc file reached through it (maps, mem, pagemap) is empty,
// while /proc/PID/task/TID/... of a live thread still works.
//
// Two writer threads each own one private anonymous region and keep writing
// non-zero data to it: at the start of page P of its region, thread T (1 or
// 2) stores, as its N-th write,
//   word 0 = (T << 48) | N        word 1 = P | (1 << 63)
// Every other byte of the regions is filled with a non-zero pattern first.
//
// Protocol on stdout (line based, flushed):
//   region <name> 0x<start> 0x<end>     one per region, end exclusive
//   pid <PID> ready                     the leader is a zombie and both writers run
//                                       (with --leader-waits: both writers run)
//   leader exiting                      with --leader-waits: answer to "exit"
// Options: --mib N (per region, default 8), --rate W (writes a second per
// thread, default 20000; 0 = as fast as possible), --leader-waits (the main
// thread exits only when it reads the line "exit" on stdin, so a test can
// attach first and see the leader go while Ferry holds the process).
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define WRITTEN_FLAG (1ULL << 63)
#define BATCH 64

struct writer {
    int number;
    uint8_t *base;
    size_t pages;
};

static unsigned long opt_mib = 8, opt_rate = 20000;
static int opt_leader_waits;
static atomic_int started;
static pid_t leader;

static void sleep_ns(long ns) {
    struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

/// The state letter of the leader in /proc/PID/stat, or 0 when unreadable.
static char leader_state(void) {
    char path[64], buffer[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)leader);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buffer, sizeof buffer - 1);
    close(fd);
    if (n <= 0) return 0;
    buffer[n] = 0;
    char *close_paren = strrchr(buffer, ')');
    return close_paren && close_paren[1] == ' ' ? close_paren[2] : 0;
}

static void *write_loop(void *argument) {
    struct writer *w = argument;
    atomic_fetch_add(&started, 1);
    if (w->number == 1 && !opt_leader_waits) {
        // Announce readiness only once the leader is gone for good.
        while (leader_state() != 'Z') sleep_ns(1000000);
        printf("pid %d ready\n", (int)leader);
        fflush(stdout);
    }
    uint64_t count = 0, state = 0x9E3779B97F4A7C15ULL * (uint64_t)w->number;
    long pause = opt_rate ? (long)(1000000000.0 * BATCH / opt_rate) : 0;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            size_t page = state % w->pages;
            uint64_t *word = (uint64_t *)(w->base + page * PAGE);
            count++;
            word[0] = ((uint64_t)w->number << 48) | count;
            word[1] = page | WRITTEN_FLAG;
        }
        if (pause) sleep_ns(pause);
    }
    return NULL;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc) opt_mib = strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--rate") && i + 1 < argc) opt_rate = strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--leader-waits")) opt_leader_waits = 1;
        else {
            fprintf(stderr, "usage: deadleader [--mib N] [--rate WRITES_PER_SECOND] [--leader-waits]\n");
            return 2;
        }
    }
    leader = getpid();
    static struct writer writers[2];
    for (int t = 0; t < 2; t++) {
        size_t bytes = opt_mib << 20;
        uint8_t *base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED) { perror("mmap"); return 1; }
        uint64_t key = 0xD1B54A32D192ED03ULL * (uint64_t)(t + 1);
        for (size_t o = 0; o < bytes; o += 8) *(uint64_t *)(base + o) = (o ^ key) | 1;
        writers[t] = (struct writer){ t + 1, base, bytes / PAGE };
        printf("region writer%d 0x%" PRIxPTR " 0x%" PRIxPTR "\n", t + 1, (uintptr_t)base, (uintptr_t)(base + bytes));
    }
    fflush(stdout);
    for (int t = 0; t < 2; t++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, write_loop, &writers[t]) != 0) { perror("pthread_create"); return 1; }
    }
    while (atomic_load(&started) < 2) sleep_ns(100000);
    if (opt_leader_waits) {
        printf("pid %d ready\n", (int)leader);
        fflush(stdout);
        char line[64];
        while (fgets(line, sizeof line, stdin) && strcmp(line, "exit\n") != 0) {}
        printf("leader exiting\n");
        fflush(stdout);
    }
    // The main thread leaves; the process lives on in its writers.
    pthread_exit(NULL);
}
