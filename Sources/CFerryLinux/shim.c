// Implementation of the CFerryLinux shim. See include/CFerryLinux.h.
#define _GNU_SOURCE
#include "CFerryLinux.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <sys/user.h>
#include <sys/wait.h>
#if defined(__aarch64__)
#include <elf.h>
#include <asm/ptrace.h>
#endif

// The kernel ABI these copies must match (include/uapi/linux/fs.h, userfaultfd.h).
_Static_assert(sizeof(struct pm_scan_arg) == 96, "struct pm_scan_arg is 12 u64");
_Static_assert(sizeof(struct page_region) == 24, "struct page_region is 3 u64");
_Static_assert(offsetof(struct pm_scan_arg, walk_end) == 32, "pm_scan_arg.walk_end");
_Static_assert(offsetof(struct pm_scan_arg, return_mask) == 88, "pm_scan_arg.return_mask");
_Static_assert(sizeof(struct uffd_msg) == 32, "struct uffd_msg is 32 bytes");
_Static_assert(sizeof(struct uffdio_api) == 24, "struct uffdio_api");
_Static_assert(sizeof(struct uffdio_register) == 32, "struct uffdio_register");
_Static_assert(sizeof(struct uffdio_writeprotect) == 24, "struct uffdio_writeprotect");
_Static_assert(sizeof(struct uffdio_copy) == 40, "struct uffdio_copy");
_Static_assert(sizeof(struct uffdio_poison) == 32, "struct uffdio_poison");
#if defined(__x86_64__)
_Static_assert(sizeof(struct user_regs_struct) <= sizeof(ferry_regs), "ferry_regs holds user_regs_struct");
#elif defined(__aarch64__)
_Static_assert(sizeof(struct user_pt_regs) <= sizeof(ferry_regs), "ferry_regs holds user_pt_regs");
#endif

uint64_t ferry_uffd_api(void) { return UFFD_API; }
uint64_t ferry_uffd_feature_wp(void) { return UFFD_FEATURE_PAGEFAULT_FLAG_WP; }
uint64_t ferry_uffd_feature_wp_async(void) { return UFFD_FEATURE_WP_ASYNC; }
uint64_t ferry_uffd_feature_wp_unpopulated(void) { return UFFD_FEATURE_WP_UNPOPULATED; }
uint64_t ferry_uffd_feature_wp_hugetlbfs_shmem(void) { return UFFD_FEATURE_WP_HUGETLBFS_SHMEM; }
uint64_t ferry_uffd_feature_event_remove(void) { return UFFD_FEATURE_EVENT_REMOVE; }
uint64_t ferry_uffd_feature_event_unmap(void) { return UFFD_FEATURE_EVENT_UNMAP; }
uint64_t ferry_uffd_feature_event_remap(void) { return UFFD_FEATURE_EVENT_REMAP; }
int ferry_uffd_user_mode_only(void) { return UFFD_USER_MODE_ONLY; }
uint64_t ferry_uffdio_register_mode_missing(void) { return UFFDIO_REGISTER_MODE_MISSING; }
uint64_t ferry_uffdio_register_mode_wp(void) { return UFFDIO_REGISTER_MODE_WP; }
uint64_t ferry_uffdio_writeprotect_mode_wp(void) { return UFFDIO_WRITEPROTECT_MODE_WP; }
uint64_t ferry_uffdio_writeprotect_mode_dontwake(void) { return UFFDIO_WRITEPROTECT_MODE_DONTWAKE; }
uint8_t ferry_uffd_event_pagefault(void) { return UFFD_EVENT_PAGEFAULT; }
uint8_t ferry_uffd_event_remove(void) { return UFFD_EVENT_REMOVE; }
uint8_t ferry_uffd_event_unmap(void) { return UFFD_EVENT_UNMAP; }
uint8_t ferry_uffd_event_remap(void) { return UFFD_EVENT_REMAP; }
uint8_t ferry_uffd_event_fork(void) { return UFFD_EVENT_FORK; }
uint64_t ferry_uffd_pagefault_flag_wp(void) { return UFFD_PAGEFAULT_FLAG_WP; }
uint64_t ferry_page_is_written(void) { return PAGE_IS_WRITTEN; }
uint64_t ferry_page_is_present(void) { return PAGE_IS_PRESENT; }
uint64_t ferry_page_is_swapped(void) { return PAGE_IS_SWAPPED; }
uint64_t ferry_pm_scan_wp_matching(void) { return PM_SCAN_WP_MATCHING; }
uint64_t ferry_pm_scan_check_wpasync(void) { return PM_SCAN_CHECK_WPASYNC; }

int ferry_userfaultfd(int flags) { return (int)syscall(__NR_userfaultfd, flags); }
long ferry_syscall_number_userfaultfd(void) { return __NR_userfaultfd; }
long ferry_syscall_number_close(void) { return __NR_close; }
long ferry_syscall_number_mmap(void) { return __NR_mmap; }
long ferry_syscall_number_munmap(void) { return __NR_munmap; }

#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif
int ferry_pidfd_open(pid_t pid, unsigned int flags) { return (int)syscall(__NR_pidfd_open, pid, flags); }
int ferry_pidfd_getfd(int pidfd, int targetfd, unsigned int flags) {
    return (int)syscall(__NR_pidfd_getfd, pidfd, targetfd, flags);
}
ssize_t ferry_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long liovcnt,
                               const struct iovec *remote, unsigned long riovcnt) {
    return process_vm_readv(pid, local, liovcnt, remote, riovcnt, 0);
}
int ferry_tgkill(pid_t tgid, pid_t tid, int sig) { return (int)syscall(__NR_tgkill, tgid, tid, sig); }
ssize_t ferry_copy_file_range(int fd_in, long long *off_in, int fd_out, long long *off_out, size_t len) {
    _Static_assert(sizeof(long long) == sizeof(loff_t), "loff_t is 64 bits");
    return copy_file_range(fd_in, (loff_t *)off_in, fd_out, (loff_t *)off_out, len, 0);
}
int ferry_punch_hole(int fd, long long offset, long long length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length);
}

static const int ferry_deferred_signals[] = { SIGINT, SIGTERM, SIGHUP, SIGTSTP };
#define FERRY_DEFERRED_COUNT ((int)(sizeof(ferry_deferred_signals) / sizeof(ferry_deferred_signals[0])))
static volatile sig_atomic_t ferry_deferred_caught[FERRY_DEFERRED_COUNT];
static struct sigaction ferry_deferred_saved[FERRY_DEFERRED_COUNT];

/* Async-signal-safe: one store. */
static void ferry_deferred_handler(int sig) {
    for (int i = 0; i < FERRY_DEFERRED_COUNT; i++) {
        if (ferry_deferred_signals[i] == sig) ferry_deferred_caught[i] = 1;
    }
}

int ferry_signals_defer(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = ferry_deferred_handler;
    sigfillset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (int i = 0; i < FERRY_DEFERRED_COUNT; i++) {
        ferry_deferred_caught[i] = 0;
        if (sigaction(ferry_deferred_signals[i], &action, &ferry_deferred_saved[i]) != 0) {
            int saved = errno;
            for (int j = 0; j < i; j++) sigaction(ferry_deferred_signals[j], &ferry_deferred_saved[j], NULL);
            errno = saved;
            return -1;
        }
    }
    return 0;
}

static int ferry_caught_write_end = -1;
static int ferry_caught_read_end = -1;

/* Async-signal-safe: write(2) of one byte to a non-blocking pipe. */
static void ferry_caught_handler(int sig) {
    int saved = errno;
    unsigned char byte = (unsigned char)sig;
    if (ferry_caught_write_end >= 0) {
        ssize_t ignored = write(ferry_caught_write_end, &byte, 1);
        (void)ignored;
    }
    errno = saved;
}

int ferry_signals_catch(const int *signals, int count) {
    if (ferry_caught_write_end < 0) {
        int fds[2];
        if (pipe2(fds, O_CLOEXEC) != 0) return -1;
        if (fcntl(fds[1], F_SETFL, O_NONBLOCK) != 0) {
            int saved = errno;
            close(fds[0]);
            close(fds[1]);
            errno = saved;
            return -1;
        }
        ferry_caught_read_end = fds[0];
        ferry_caught_write_end = fds[1];
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = ferry_caught_handler;
    sigfillset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (int i = 0; i < count; i++) {
        if (sigaction(signals[i], &action, NULL) != 0) return -1;
    }
    return ferry_caught_read_end;
}

int ferry_signal_default_action(int sig) {
    struct sigaction fallback, saved;
    memset(&fallback, 0, sizeof fallback);
    fallback.sa_handler = SIG_DFL;
    sigemptyset(&fallback.sa_mask);
    if (sigaction(sig, &fallback, &saved) != 0) return -1;
    sigset_t only, before;
    sigemptyset(&only);
    sigaddset(&only, sig);
    pthread_sigmask(SIG_UNBLOCK, &only, &before);
    /* Sent to this thread and not blocked: taken before raise returns. */
    raise(sig);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    return sigaction(sig, &saved, NULL);
}

int ferry_signals_release(void) {
    int result = 0;
    for (int i = 0; i < FERRY_DEFERRED_COUNT; i++) {
        if (sigaction(ferry_deferred_signals[i], &ferry_deferred_saved[i], NULL) != 0) result = -1;
    }
    for (int i = 0; i < FERRY_DEFERRED_COUNT; i++) {
        if (ferry_deferred_caught[i]) {
            ferry_deferred_caught[i] = 0;
            kill(getpid(), ferry_deferred_signals[i]);
        }
    }
    return result;
}

int ferry_uffdio_api(int fd, struct uffdio_api *api) { return ioctl(fd, UFFDIO_API, api); }
int ferry_uffdio_register(int fd, struct uffdio_register *reg) { return ioctl(fd, UFFDIO_REGISTER, reg); }
int ferry_uffdio_unregister(int fd, struct uffdio_range *range) { return ioctl(fd, UFFDIO_UNREGISTER, range); }
int ferry_uffdio_writeprotect(int fd, struct uffdio_writeprotect *wp) { return ioctl(fd, UFFDIO_WRITEPROTECT, wp); }
int ferry_uffdio_wake(int fd, struct uffdio_range *range) { return ioctl(fd, UFFDIO_WAKE, range); }
int ferry_uffdio_zeropage(int fd, struct uffdio_zeropage *zero) { return ioctl(fd, UFFDIO_ZEROPAGE, zero); }
int ferry_uffdio_copy(int fd, struct uffdio_copy *copy) { return ioctl(fd, UFFDIO_COPY, copy); }
int ferry_uffdio_poison(int fd, struct uffdio_poison *poison) { return ioctl(fd, UFFDIO_POISON, poison); }
long ferry_pagemap_scan(int fd, struct pm_scan_arg *arg) { return ioctl(fd, PAGEMAP_SCAN, arg); }

uint8_t ferry_uffd_msg_event(const struct uffd_msg *msg) { return msg->event; }
uint64_t ferry_uffd_msg_pagefault_address(const struct uffd_msg *msg) { return msg->arg.pagefault.address; }
uint64_t ferry_uffd_msg_pagefault_flags(const struct uffd_msg *msg) { return msg->arg.pagefault.flags; }
uint64_t ferry_uffd_msg_remove_start(const struct uffd_msg *msg) { return msg->arg.remove.start; }
uint64_t ferry_uffd_msg_remove_end(const struct uffd_msg *msg) { return msg->arg.remove.end; }
uint64_t ferry_uffd_msg_remap_from(const struct uffd_msg *msg) { return msg->arg.remap.from; }
uint64_t ferry_uffd_msg_remap_to(const struct uffd_msg *msg) { return msg->arg.remap.to; }
uint64_t ferry_uffd_msg_remap_len(const struct uffd_msg *msg) { return msg->arg.remap.len; }
int32_t ferry_uffd_msg_fork_ufd(const struct uffd_msg *msg) { return (int32_t)msg->arg.fork.ufd; }

int ferry_recv_fd(int sock) {
    char byte;
    struct iovec iov = { .iov_base = &byte, .iov_len = 1 };
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof(control));
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space, .msg_controllen = sizeof(control.space) };
    ssize_t got;
    do { got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (got < 0 && errno == EINTR);
    if (got < 0) return -1;
    if (got == 0) { errno = ENOMSG; return -1; }
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (!cmsg || cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS || cmsg->cmsg_len != CMSG_LEN(sizeof(int))) {
        errno = EBADMSG;
        return -1;
    }
    int fd;
    memcpy(&fd, CMSG_DATA(cmsg), sizeof(fd));
    return fd;
}

long ferry_ptrace_seize(pid_t tid, unsigned long options) { return ptrace(PTRACE_SEIZE, tid, 0, (void *)options); }
long ferry_ptrace_interrupt(pid_t tid) { return ptrace(PTRACE_INTERRUPT, tid, 0, 0); }
long ferry_ptrace_detach(pid_t tid, int sig) { return ptrace(PTRACE_DETACH, tid, 0, (void *)(long)sig); }
long ferry_ptrace_singlestep(pid_t tid, int sig) { return ptrace(PTRACE_SINGLESTEP, tid, 0, (void *)(long)sig); }
long ferry_ptrace_getsiginfo(pid_t tid, siginfo_t *info) { return ptrace(PTRACE_GETSIGINFO, tid, 0, info); }
long ferry_ptrace_setsiginfo(pid_t tid, const siginfo_t *info) { return ptrace(PTRACE_SETSIGINFO, tid, 0, info); }
#ifndef PTRACE_GETSIGMASK
#define PTRACE_GETSIGMASK 0x420a
#define PTRACE_SETSIGMASK 0x420b
#endif
long ferry_ptrace_getsigmask(pid_t tid, uint64_t *mask) { return ptrace(PTRACE_GETSIGMASK, tid, (void *)sizeof *mask, mask); }
long ferry_ptrace_setsigmask(pid_t tid, const uint64_t *mask) { return ptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof *mask, mask); }

int ferry_wifexited(int status) { return WIFEXITED(status); }
int ferry_wifsignaled(int status) { return WIFSIGNALED(status); }
int ferry_wifstopped(int status) { return WIFSTOPPED(status); }
int ferry_wstopsig(int status) { return WSTOPSIG(status); }
int ferry_wptrace_event(int status) { return (status >> 16) & 0xff; }
int ferry_wall(void) { return __WALL; }

#if defined(__x86_64__)
long ferry_regs_get(pid_t tid, ferry_regs *regs) {
    memset(regs, 0, sizeof *regs);
    return ptrace(PTRACE_GETREGS, tid, 0, (struct user_regs_struct *)regs);
}
long ferry_regs_set(pid_t tid, const ferry_regs *regs) {
    return ptrace(PTRACE_SETREGS, tid, 0, (const struct user_regs_struct *)regs);
}
uint64_t ferry_regs_ip(const ferry_regs *regs) { return ((const struct user_regs_struct *)regs)->rip; }
void ferry_regs_prepare_syscall(ferry_regs *regs, uint64_t ip, long nr,
                                uint64_t a0, uint64_t a1, uint64_t a2,
                                uint64_t a3, uint64_t a4, uint64_t a5) {
    struct user_regs_struct *r = (struct user_regs_struct *)regs;
    r->rip = ip;
    r->rax = (uint64_t)nr;
    // orig_rax = -1: the kernel must not treat the resume as the end of an
    // interrupted system call and "restart" it over our registers.
    r->orig_rax = (uint64_t)-1;
    r->rdi = a0; r->rsi = a1; r->rdx = a2; r->r10 = a3; r->r8 = a4; r->r9 = a5;
    // Clear the trap and direction flags so the step starts in a known state.
    r->eflags &= ~((1UL << 8) | (1UL << 10));
}
long ferry_regs_syscall_result(const ferry_regs *regs) { return (long)((const struct user_regs_struct *)regs)->rax; }
int ferry_syscall_instruction(uint8_t out[4]) { out[0] = 0x0f; out[1] = 0x05; return 2; }
#elif defined(__aarch64__)
static long regset(pid_t tid, int request, ferry_regs *regs) {
    struct iovec iov = { .iov_base = regs, .iov_len = sizeof(struct user_pt_regs) };
    return ptrace(request, tid, (void *)NT_PRSTATUS, &iov);
}
long ferry_regs_get(pid_t tid, ferry_regs *regs) { memset(regs, 0, sizeof *regs); return regset(tid, PTRACE_GETREGSET, regs); }
long ferry_regs_set(pid_t tid, const ferry_regs *regs) { return regset(tid, PTRACE_SETREGSET, (ferry_regs *)regs); }
uint64_t ferry_regs_ip(const ferry_regs *regs) { return ((const struct user_pt_regs *)regs)->pc; }
void ferry_regs_prepare_syscall(ferry_regs *regs, uint64_t ip, long nr,
                                uint64_t a0, uint64_t a1, uint64_t a2,
                                uint64_t a3, uint64_t a4, uint64_t a5) {
    // Untested on arm64: the syscall-restart suppression that x86 gets from
    // orig_rax needs NT_ARM_SYSTEM_CALL there.
    struct user_pt_regs *r = (struct user_pt_regs *)regs;
    r->pc = ip;
    r->regs[8] = (uint64_t)nr;
    r->regs[0] = a0; r->regs[1] = a1; r->regs[2] = a2; r->regs[3] = a3; r->regs[4] = a4; r->regs[5] = a5;
}
long ferry_regs_syscall_result(const ferry_regs *regs) { return (long)((const struct user_pt_regs *)regs)->regs[0]; }
int ferry_syscall_instruction(uint8_t out[4]) { out[0] = 0x01; out[1] = 0x00; out[2] = 0x00; out[3] = 0xd4; return 4; }
#else
#error "CFerryLinux supports x86_64 and aarch64"
#endif

#include <malloc.h>

void ferry_tune_malloc_for_bulk(void) {
    // Freed 1 MiB frame buffers stay in the heap instead of going back to
    // the kernel and faulting in again, zeroed, for the next frame.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

#include <sys/resource.h>
#include <sys/syscall.h>

int ferry_nice_this_thread(int nice) {
    // Linux keeps a nice value per thread: PRIO_PROCESS with a thread id.
    return setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), nice);
}

// A thread's EEVDF slice (kernel 6.12+: sched_attr.sched_runtime under
// SCHED_OTHER; older kernels accept and ignore it). A short slice lets a
// thread that wakes preempt a busy one at once instead of at the end of its
// slice. 0 restores the default. The thread's nice value is kept.
struct ferry_sched_attr {
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};
int ferry_set_slice(int tid, uint64_t nanoseconds) {
    struct ferry_sched_attr attr = {0};
    attr.size = sizeof attr;
    attr.sched_policy = 0; /* SCHED_OTHER */
    attr.sched_nice = getpriority(PRIO_PROCESS, (id_t)(tid ? tid : syscall(SYS_gettid)));
    attr.sched_runtime = nanoseconds;
    return (int)syscall(SYS_sched_setattr, tid, &attr, 0);
}

#ifndef HUGETLBFS_MAGIC
#define HUGETLBFS_MAGIC 0x958458f6
#endif

int64_t ferry_hugetlbfs_page_size(const char *path) {
    struct statfs info;
    if (statfs(path, &info) != 0) return -1;
    return info.f_type == HUGETLBFS_MAGIC ? (int64_t)info.f_bsize : 0;
}

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif

int ferry_map_hugetlb_flags(uint64_t page_size) {
    if (page_size <= (uint64_t)sysconf(_SC_PAGESIZE)) return 0;
    return MAP_HUGETLB | (__builtin_ctzll(page_size) << MAP_HUGE_SHIFT);
}
