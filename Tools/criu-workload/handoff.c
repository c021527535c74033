// A process that hands its memory to a lazy-pages daemon the way
// `criu restore --lazy-pages` does (criu/uffd.c), then changes that memory
// while the daemon fills it: the test of Ferry as CRIU's lazy-pages daemon
// without CRIU (Tests/FerryMigrationTests/LazyRestoreTests.swift).
//
// Usage: handoff SOCKET MODE      MODE: churn | touch
// Memory: PAGES pages at BASE. Pages 0..63 are "restored" by us (0xAB);
// CRIU would leave 64..899 lazy (the daemon fills them with pattern(address));
// 900..PAGES-1 were never used at the source (they must read zero).
// Pages 500..511 are a VMA of their own (also executable), as adjacent
// mappings are that CRIU puts in one lazy pagemap entry: one install must
// not cross from one into the next.
// After the handoff (in touch mode first a zombie's negated pid; then the
// pid, the userfaultfd with SCM_RIGHTS, and 0x52535446) it
// prints "handed", and then:
//   churn  MADV_DONTNEED on 100..149 (must read zero), munmap 200..219,
//          mremap 300..339 to MOVED, fork (the child checks 400..899 and
//          prints "child ok=N bad=M"); prints "churned"; waits for a line
//          on stdin; then checks every page and prints
//          "parent ok=N bad=M first_bad=0x..." and exits.
//   touch  waits for a line; touches page 64 with a SIGBUS handler: prints
//          "sigbus" or "read ok" / "read bad".
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define PAGES 1024UL
#define BASE ((char *)0x5a0000000000UL)
#define MOVED ((char *)0x5a1000000000UL)

static uint64_t word(uint64_t address) {
    uint64_t x = address * 0x9E3779B97F4A7C15ULL;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ULL;
    return x ^ (x >> 32);
}

// The source's bytes of the page at `image` (what the daemon must install).
static int is_pattern(const char *page, uint64_t image) {
    const uint64_t *words = (const uint64_t *)page;
    for (unsigned i = 0; i < PAGE / 8; i++)
        if (words[i] != word(image + i * 8)) return 0;
    return 1;
}

static int is_filled(const char *page, int byte) {
    for (unsigned i = 0; i < PAGE; i++)
        if ((unsigned char)page[i] != byte) return 0;
    return 1;
}

static void die(const char *what) {
    printf("error %s: %s\n", what, strerror(errno));
    fflush(stdout);
    exit(1);
}

static void hand_over(const char *path, int zombie_first) {
    int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0) die("userfaultfd");
    struct uffdio_api api = { .api = UFFD_API,
        .features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE };
    if (ioctl(uffd, UFFDIO_API, &api)) die("UFFDIO_API");
    struct uffdio_register reg = { .range = { (uint64_t)BASE, PAGES * PAGE }, .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg)) die("UFFDIO_REGISTER");

    int sock = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un address = { .sun_family = AF_UNIX };
    strncpy(address.sun_path, path, sizeof(address.sun_path) - 1);
    if (connect(sock, (struct sockaddr *)&address, sizeof(address))) die("connect");
    // A zombie task has no memory: its negated pid, and nothing after it.
    int zombie = -4242;
    if (zombie_first && send(sock, &zombie, sizeof(zombie), 0) != sizeof(zombie)) die("send zombie");
    int pid = getpid();
    if (send(sock, &pid, sizeof(pid), 0) != sizeof(pid)) die("send pid");
    char dummy = 0;
    struct iovec iov = { &dummy, 1 };
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof(control.space) };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cmsg), &uffd, sizeof(int));
    if (sendmsg(sock, &msg, 0) != 1) die("sendmsg");
    uint32_t finished = 0x52535446;
    if (send(sock, &finished, sizeof(finished), 0) != sizeof(finished)) die("send finished");
    close(sock);
    close(uffd);
}

static sigjmp_buf on_sigbus;
static void sigbus(int signal) { (void)signal; siglongjmp(on_sigbus, 1); }

static void wait_for_line(void) {
    char line[16];
    if (!fgets(line, sizeof(line), stdin)) exit(2);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: handoff SOCKET churn|touch\n"); return 2; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    char *base = mmap(BASE, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (base != BASE) die("mmap");
    if (mprotect(base + 500 * PAGE, 12 * PAGE, PROT_READ | PROT_WRITE | PROT_EXEC)) die("mprotect");
    for (unsigned long i = 0; i < 64; i++) memset(base + i * PAGE, 0xAB, PAGE);
    hand_over(argv[1], strcmp(argv[2], "touch") == 0);
    printf("handed\n");

    if (strcmp(argv[2], "touch") == 0) {
        wait_for_line();
        signal(SIGBUS, sigbus);
        if (sigsetjmp(on_sigbus, 1)) { printf("sigbus\n"); return 0; }
        printf(is_pattern(base + 64 * PAGE, (uint64_t)(base + 64 * PAGE)) ? "read ok\n" : "read bad\n");
        return 0;
    }

    if (madvise(base + 100 * PAGE, 50 * PAGE, MADV_DONTNEED)) die("madvise");
    if (munmap(base + 200 * PAGE, 20 * PAGE)) die("munmap");
    if (mremap(base + 300 * PAGE, 40 * PAGE, 40 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, MOVED) != MOVED) die("mremap");
    int gate[2];
    if (pipe(gate)) die("pipe");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        char byte;
        if (read(gate[0], &byte, 1) != 1) _exit(3);
        unsigned ok = 0, bad = 0;
        for (unsigned long i = 400; i < 900; i++) {
            if (is_pattern(base + i * PAGE, (uint64_t)(base + i * PAGE))) ok++; else bad++;
        }
        printf("child ok=%u bad=%u\n", ok, bad);
        _exit(0);
    }
    printf("churned\n");
    wait_for_line();
    if (write(gate[1], "g", 1) != 1) die("write");

    unsigned ok = 0, bad = 0;
    uint64_t first_bad = 0;
    for (unsigned long i = 0; i < PAGES; i++) {
        if (i >= 200 && i < 220) continue;  // unmapped
        const char *page = i >= 300 && i < 340 ? MOVED + (i - 300) * PAGE : base + i * PAGE;
        int good;
        if (i < 64) good = is_filled(page, 0xAB);
        else if ((i >= 100 && i < 150) || i >= 900) good = is_filled(page, 0);
        else good = is_pattern(page, (uint64_t)(base + i * PAGE));
        if (good) ok++;
        else { bad++; if (!first_bad) first_bad = (uint64_t)(base + i * PAGE); }
    }
    int status = 0;
    waitpid(child, &status, 0);
    printf("parent ok=%u bad=%u first_bad=0x%llx\n", ok, bad, (unsigned long long)first_bad);
    return 0;
}
