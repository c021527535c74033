// The guardian process of post-copy memory in another process.
//
// Why C, and why fork without exec: the child of a multithreaded process may
// only make async-signal-safe calls until it execs. Everything below is a
// system call (no allocation, no locks, no Swift runtime), so the guardian
// runs on its copy of the parent's memory and needs no binary of its own.
// The parent must keep the fork cheap: large private mappings the guardian
// never reads (the leecher's staging arena) carry MADV_DONTFORK.
//
// Death of the parent is seen as end of file on a pipe, not PR_SET_PDEATHSIG,
// which fires when the forking *thread* exits, not the process.
//
// Kernel: UFFDIO_POISON 6.6+, close_range 5.9+ (a loop of close otherwise).
#define _GNU_SOURCE
#include "CFerryGuardian.h"
#include "CFerryLinux.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

#ifndef __NR_close_range
#define __NR_close_range 436
#endif

/// Closes every descriptor but `keep1` and `keep2`: the guardian must not keep
/// the parent's sockets (the seeder would not see the leecher go), pipes
/// (a test waiting for the leecher's output to end) or its own write end.
static void guardian_close_others(int keep1, int keep2) {
    int low = keep1 < keep2 ? keep1 : keep2, high = keep1 < keep2 ? keep2 : keep1;
    unsigned int bounds[3][2] = { { 0, (unsigned)low - 1 }, { (unsigned)low + 1, (unsigned)high - 1 },
                                  { (unsigned)high + 1, ~0U } };
    for (int i = 0; i < 3; i++) {
        if (bounds[i][0] > bounds[i][1] || (i == 0 && low == 0)) continue;
        if (syscall(__NR_close_range, bounds[i][0], bounds[i][1], 0) == 0) continue;
        unsigned int last = bounds[i][1] > 4096 ? 4096 : bounds[i][1];
        for (unsigned int fd = bounds[i][0]; fd <= last; fd++) close((int)fd);
    }
}

/// Poisons the pages of [start, end) that are not present, in pages of
/// `page` bytes (hugetlb memory is poisoned only in whole huge pages, at
/// their alignment). UFFDIO_POISON stops at the first present page: EEXIST
/// when it is the first (skip it), EAGAIN with `updated` bytes done
/// otherwise (go on after them).
static void guardian_poison(int uffd, uint64_t start, uint64_t end, uint64_t page) {
    uint64_t address = start;
    int busy = 0;
    while (address < end) {
        struct uffdio_poison request;
        memset(&request, 0, sizeof request);
        request.range.start = address;
        request.range.len = end - address;
        if (ioctl(uffd, UFFDIO_POISON, &request) == 0) return;
        int error = errno;
        if (request.updated > 0) { address += (uint64_t)request.updated; continue; }
        if (error == EINTR) continue;
        if (error == ESRCH) _exit(0);  // the target is gone: nothing left to protect
        if (error == EAGAIN && busy++ < 10000) {
            struct timespec pause = { 0, 100000 };
            nanosleep(&pause, NULL);
            continue;
        }
        address += page;  // EEXIST (present), or a page we cannot poison (unmapped since)
    }
}

static void guardian_main(int uffd, int control, const uint64_t *ranges, size_t range_count) {
    // Out of the leecher's process group and session: a hangup of its
    // terminal or a signal to its group must not take the guardian with it.
    setsid();
    prctl(PR_SET_NAME, "ferry-guardian", 0, 0, 0);
    struct sigaction ignore;
    memset(&ignore, 0, sizeof ignore);
    ignore.sa_handler = SIG_IGN;
    const int ignored[] = { SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGPIPE, SIGUSR1, SIGUSR2 };
    for (size_t i = 0; i < sizeof ignored / sizeof ignored[0]; i++) sigaction(ignored[i], &ignore, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    guardian_close_others(uffd, control);
    // Best effort (needs CAP_SYS_RESOURCE): the OOM killer that may end the
    // leecher must spare the few pages of its guardian.
    int oom = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (oom >= 0) {
        (void)!write(oom, "-1000", 5);
        close(oom);
    }
    char byte;
    ssize_t n;
    do n = read(control, &byte, 1); while (n < 0 && errno == EINTR);
    if (n == 1) _exit(0);  // dismissed: the parent ended post-copy in order
    for (size_t i = 0; i < range_count; i++) guardian_poison(uffd, ranges[3 * i], ranges[3 * i + 1], ranges[3 * i + 2]);
    _exit(0);
}

pid_t ferry_guardian_spawn(int uffd, const uint64_t *ranges, size_t range_count, int *control) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return -1;
    pid_t pid = fork();
    if (pid == 0) guardian_main(uffd, fds[0], ranges, range_count);
    int saved = errno;
    close(fds[0]);
    if (pid < 0) {
        close(fds[1]);
        errno = saved;
        return -1;
    }
    *control = fds[1];
    return pid;
}
