// The only C shim of Ferry: syscall wrappers glibc lacks, ptrace register
// access, and the userfaultfd / pagemap structures that Debian 12's kernel
// headers predate. Every symbol is prefixed `ferry_`; macros become functions.
// Structures copied from the kernel's uapi are guarded by #ifndef so newer
// headers win, and their sizes are checked with _Static_assert in shim.c.
#ifndef CFERRYLINUX_H
#define CFERRYLINUX_H

#include <stdint.h>
#include <sys/types.h>
#include <signal.h>
#include <sys/uio.h>
#include <linux/userfaultfd.h>
// <linux/fs.h> is not included: it clashes with glibc's <sys/mount.h> in
// Swift's module map, and Debian 12's copy lacks PAGEMAP_SCAN anyway.

// MARK: - userfaultfd uapi additions (kernel 6.4 / 6.7)

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif

// UFFDIO_POISON (kernel 6.6): resolves a missing fault with a marker that
// raises SIGBUS on access; how post-copy fails a page it cannot fetch.
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    uint64_t mode;
    int64_t updated;
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

// MARK: - PAGEMAP_SCAN uapi (kernel 6.7, include/uapi/linux/fs.h)

#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

// Constants as values Swift can import (the originals are macros built from _IOWR etc.).
uint64_t ferry_uffd_api(void);
uint64_t ferry_uffd_feature_wp(void);
uint64_t ferry_uffd_feature_wp_async(void);
uint64_t ferry_uffd_feature_wp_unpopulated(void);
uint64_t ferry_uffd_feature_wp_hugetlbfs_shmem(void);
uint64_t ferry_uffd_feature_event_remove(void);
uint64_t ferry_uffd_feature_event_unmap(void);
uint64_t ferry_uffd_feature_event_remap(void);
int ferry_uffd_user_mode_only(void);
uint64_t ferry_uffdio_register_mode_missing(void);
uint64_t ferry_uffdio_register_mode_wp(void);
uint64_t ferry_uffdio_writeprotect_mode_wp(void);
uint64_t ferry_uffdio_writeprotect_mode_dontwake(void);
uint8_t ferry_uffd_event_pagefault(void);
uint8_t ferry_uffd_event_remove(void);
uint8_t ferry_uffd_event_unmap(void);
uint8_t ferry_uffd_event_remap(void);
uint8_t ferry_uffd_event_fork(void);
uint64_t ferry_uffd_pagefault_flag_wp(void);
uint64_t ferry_page_is_written(void);
uint64_t ferry_page_is_present(void);
uint64_t ferry_page_is_swapped(void);
uint64_t ferry_pm_scan_wp_matching(void);
uint64_t ferry_pm_scan_check_wpasync(void);

// MARK: - syscall wrappers: return -1 and set errno on failure, like libc.

int ferry_userfaultfd(int flags);
long ferry_syscall_number_userfaultfd(void);
long ferry_syscall_number_close(void);
long ferry_syscall_number_mmap(void);
long ferry_syscall_number_munmap(void);
int ferry_pidfd_open(pid_t pid, unsigned int flags);
int ferry_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
ssize_t ferry_process_vm_readv(pid_t pid, const struct iovec *local, unsigned long liovcnt,
                               const struct iovec *remote, unsigned long riovcnt);
int ferry_tgkill(pid_t tgid, pid_t tid, int sig);
ssize_t ferry_copy_file_range(int fd_in, long long *off_in, int fd_out, long long *off_out, size_t len);
int ferry_punch_hole(int fd, long long offset, long long length);

/* Deferring SIGINT, SIGTERM, SIGHUP and SIGTSTP while a remote system call
 * runs (DeferredSignals.swift). `defer` installs a handler that only marks a
 * signal caught, saving the previous dispositions; `release` restores them
 * and sends each caught signal to this process again. Not reentrant: the
 * caller serializes the two and counts nesting. Return 0, or -1 with errno. */
int ferry_signals_defer(void);
int ferry_signals_release(void);

/* Catching signals synchronously (SignalCatcher.swift): installs a handler
 * for each of `signals` that writes the signal's number, one byte, to a
 * process-wide pipe, and returns the pipe's read end (blocking), or -1 with
 * errno. The handler is in place when this returns, so no signal is lost or
 * takes its default action afterwards. */
int ferry_signals_catch(const int *signals, int count);

/* Lets `sig` take its default action on the calling thread, now (for
 * SIGTSTP: stop, unless the process group is orphaned), then puts the
 * current disposition back. Returns 0, or -1 with errno. */
int ferry_signal_default_action(int sig);

// Typed ioctls: one per request so Swift never builds a request number.
int ferry_uffdio_api(int fd, struct uffdio_api *api);
int ferry_uffdio_register(int fd, struct uffdio_register *reg);
int ferry_uffdio_unregister(int fd, struct uffdio_range *range);
int ferry_uffdio_writeprotect(int fd, struct uffdio_writeprotect *wp);
int ferry_uffdio_wake(int fd, struct uffdio_range *range);
int ferry_uffdio_zeropage(int fd, struct uffdio_zeropage *zero);
int ferry_uffdio_copy(int fd, struct uffdio_copy *copy);
int ferry_uffdio_poison(int fd, struct uffdio_poison *poison);
long ferry_pagemap_scan(int fd, struct pm_scan_arg *arg);

// Fields of uffd_msg that Swift cannot reach through the anonymous unions.
uint8_t ferry_uffd_msg_event(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_pagefault_address(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_pagefault_flags(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_remove_start(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_remove_end(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_remap_from(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_remap_to(const struct uffd_msg *msg);
uint64_t ferry_uffd_msg_remap_len(const struct uffd_msg *msg);
/// The child's new userfaultfd of a UFFD_EVENT_FORK message (now ours to close).
int32_t ferry_uffd_msg_fork_ufd(const struct uffd_msg *msg);

/// Receives one descriptor passed with SCM_RIGHTS on `sock` together with
/// one byte (CRIU's send_fd); returns it (close-on-exec), or -1 with errno
/// (ENOMSG: end of stream; EBADMSG: no descriptor came).
int ferry_recv_fd(int sock);

// MARK: - ptrace

long ferry_ptrace_seize(pid_t tid, unsigned long options);
long ferry_ptrace_interrupt(pid_t tid);
long ferry_ptrace_detach(pid_t tid, int sig);
long ferry_ptrace_singlestep(pid_t tid, int sig);
long ferry_ptrace_getsiginfo(pid_t tid, siginfo_t *info);
long ferry_ptrace_setsiginfo(pid_t tid, const siginfo_t *info);
/// The thread's blocked-signal mask as the kernel's 64-bit set (PTRACE_GETSIGMASK, 3.11+).
long ferry_ptrace_getsigmask(pid_t tid, uint64_t *mask);
long ferry_ptrace_setsigmask(pid_t tid, const uint64_t *mask);

// waitpid status decoding (macros in <sys/wait.h>).
int ferry_wifexited(int status);
int ferry_wifsignaled(int status);
int ferry_wifstopped(int status);
int ferry_wstopsig(int status);
/// The PTRACE_EVENT_* in the high bits of a stop status, 0 when none.
int ferry_wptrace_event(int status);
int ferry_wall(void);

// General-purpose registers of a stopped thread, as an opaque buffer large
// enough for the architecture's register set (x86_64: user_regs_struct,
// aarch64: user_pt_regs). Swift handles it by value and calls the functions
// below for the architecture-specific parts.
typedef struct {
    uint64_t words[40];
} ferry_regs;

long ferry_regs_get(pid_t tid, ferry_regs *regs);
long ferry_regs_set(pid_t tid, const ferry_regs *regs);
uint64_t ferry_regs_ip(const ferry_regs *regs);
/// Sets up `regs` to execute a system call instruction at `ip`: number,
/// six arguments, and no syscall restart on resume.
void ferry_regs_prepare_syscall(ferry_regs *regs, uint64_t ip, long nr,
                                uint64_t a0, uint64_t a1, uint64_t a2,
                                uint64_t a3, uint64_t a4, uint64_t a5);
/// The system call's return value after the instruction ran (negative errno on failure).
long ferry_regs_syscall_result(const ferry_regs *regs);
/// The bytes of this architecture's system call instruction; returns their count.
int ferry_syscall_instruction(uint8_t out[4]);

/// mallopt for programs that move many large buffers (see shim.c).
void ferry_tune_malloc_for_bulk(void);

/// setpriority for the calling thread only (Linux nice values are per thread).
int ferry_nice_this_thread(int nice);
int ferry_set_slice(int tid, uint64_t nanoseconds);

/// The page size of the hugetlbfs file at `path` (statfs: f_type is
/// HUGETLBFS_MAGIC, f_bsize the huge page size); 0 when the file is on
/// another file system; -1 with errno when statfs fails.
int64_t ferry_hugetlbfs_page_size(const char *path);

/// The mmap flags for anonymous memory in huge pages of `page_size` bytes
/// (a power of two above the base page): MAP_HUGETLB with the size in the
/// MAP_HUGE_SHIFT bits (MAP_HUGE_2MB, MAP_HUGE_1GB); 0 for the base page.
int ferry_map_hugetlb_flags(uint64_t page_size);

// The post-copy guardian (guardian.c).
#include "CFerryGuardian.h"

#endif
