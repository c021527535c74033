// hugemem: a process whose memory lives in huge pages, for Ferry's tests of
// hugetlb regions (issue 15, class 2).
//
// Maps, each optional and sized in huge pages of --page-kib (default 2048):
//   --private N   N huge pages of MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB
//   --shm N       a SysV segment of N huge pages (SHM_HUGETLB), attached
//                 and marked for removal at once (it goes when we exit)
//   --memfd N     a memfd of N huge pages (MFD_HUGETLB), mapped MAP_SHARED
// fills every byte with a non-zero pattern, then writes from one thread
// until killed: one 8-byte counter at a pseudo-random place of a random
// region every --pause-us microseconds (default 20).
//
// Protocol on stdout (line based, flushed):
//   region <name> 0x<start> 0x<end>     one per region, end exclusive
//   pid <PID> ready                     last line of the start-up block
//   nohuge <what> <errno text>          the kernel could not give the pages (exit 3)
//   count <writes>                      answer to the stdin command "count"
//   poked 0x<address>                   answer to "poke 0xADDR": 8 bytes written there
// Commands on stdin, one per line: count, poke 0xADDR, quit.
// With --writer 0 the writer thread is not started (only pokes write).
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#ifndef SHM_HUGE_SHIFT
#define SHM_HUGE_SHIFT 26
#endif
#ifndef MFD_HUGE_SHIFT
#define MFD_HUGE_SHIFT 26
#endif

struct region { const char *name; uint8_t *base; size_t length; };
static struct region regions[3];
static int region_count;
static atomic_ulong writes;
static unsigned long pause_us = 20;

static void fail(const char *what) {
    printf("nohuge %s %s\n", what, strerror(errno));
    fflush(stdout);
    exit(3);
}

static void fill(struct region *r, uint64_t key) {
    uint64_t *words = (uint64_t *)r->base;
    for (size_t i = 0; i < r->length / 8; i++) words[i] = (i * 8) ^ key;
}

static void *writer(void *unused) {
    (void)unused;
    uint64_t state = 0x2545F4914F6CDD1DULL;
    struct timespec pause = { 0, (long)pause_us * 1000 };
    for (;;) {
        state ^= state << 13; state ^= state >> 7; state ^= state << 17;
        struct region *r = &regions[state % (uint64_t)region_count];
        size_t offset = (size_t)((state >> 8) % (r->length / 8)) * 8;
        unsigned long n = atomic_fetch_add(&writes, 1) + 1;
        *(volatile uint64_t *)(r->base + offset) = n | (1ULL << 62);
        if (pause_us) nanosleep(&pause, NULL);
    }
    return NULL;
}

int main(int argc, char **argv) {
    unsigned long page_kib = 2048, private_pages = 0, shm_pages = 0, memfd_pages = 0, writer_on = 1;
    for (int i = 1; i + 1 < argc; i += 2) {
        unsigned long value = strtoul(argv[i + 1], NULL, 0);
        if (!strcmp(argv[i], "--page-kib")) page_kib = value;
        else if (!strcmp(argv[i], "--private")) private_pages = value;
        else if (!strcmp(argv[i], "--shm")) shm_pages = value;
        else if (!strcmp(argv[i], "--memfd")) memfd_pages = value;
        else if (!strcmp(argv[i], "--pause-us")) pause_us = value;
        else if (!strcmp(argv[i], "--writer")) writer_on = value;
        else { fprintf(stderr, "hugemem: unknown option %s\n", argv[i]); return 2; }
    }
    size_t huge = (size_t)page_kib * 1024;
    int shift = __builtin_ctzl(huge);
    if (private_pages) {
        size_t length = private_pages * huge;
        void *p = mmap(NULL, length, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | (shift << MAP_HUGE_SHIFT), -1, 0);
        if (p == MAP_FAILED) fail("private");
        regions[region_count++] = (struct region){ "private", p, length };
    }
    if (shm_pages) {
        size_t length = shm_pages * huge;
        int id = shmget(IPC_PRIVATE, length, IPC_CREAT | 0600 | SHM_HUGETLB | (shift << SHM_HUGE_SHIFT));
        if (id < 0) fail("shm");
        void *p = shmat(id, NULL, 0);
        shmctl(id, IPC_RMID, NULL);
        if (p == (void *)-1) fail("shm");
        regions[region_count++] = (struct region){ "shm", p, length };
    }
    if (memfd_pages) {
        size_t length = memfd_pages * huge;
        int fd = memfd_create("hugemem", MFD_HUGETLB | (shift << MFD_HUGE_SHIFT));
        if (fd < 0 || ftruncate(fd, (off_t)length) != 0) fail("memfd");
        void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) fail("memfd");
        regions[region_count++] = (struct region){ "memfd", p, length };
    }
    if (region_count == 0) { fprintf(stderr, "hugemem: nothing to map\n"); return 2; }
    for (int i = 0; i < region_count; i++) {
        // Touching every huge page here is where a short pool shows: SIGBUS
        // for shared mappings, so check the pool first (the test does).
        fill(&regions[i], 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 2));
        printf("region %s %p %p\n", regions[i].name, (void *)regions[i].base,
               (void *)(regions[i].base + regions[i].length));
    }
    pthread_t thread;
    if (writer_on && pthread_create(&thread, NULL, writer, NULL) != 0) { perror("pthread_create"); return 1; }
    printf("pid %d ready\n", getpid());
    fflush(stdout);
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "count", 5)) { printf("count %lu\n", atomic_load(&writes)); fflush(stdout); }
        else if (!strncmp(line, "poke ", 5)) {
            uint64_t *where = (uint64_t *)(uintptr_t)strtoull(line + 5, NULL, 16);
            *(volatile uint64_t *)where = atomic_fetch_add(&writes, 1) + 1;
            printf("poked %p\n", (void *)where);
            fflush(stdout);
        }
        else if (!strncmp(line, "quit", 4)) return 0;
    }
    for (;;) pause();
}
