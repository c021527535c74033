// Reaching a process whose main thread has exited (issue 15, class 4).
//
// When the thread-group leader calls pthread_exit while other threads run
// on, the leader stays a zombie until the last thread ends, and the kernel
// has already dropped its memory and descriptor table. Everything reached
// through the leader's task then fails or is empty: /proc/PID/maps reads
// empty, /proc/PID/mem and process_vm_readv(PID) say ESRCH, pidfd_getfd on
// pidfd_open(PID) says EBADF, and PTRACE_SEIZE refuses the zombie. The
// memory and the descriptors are the group's, though, and every live thread
// reaches them: /proc/PID/task/TID/{maps,mem,pagemap}, process_vm_readv(TID),
// and a thread pidfd (pidfd_open(TID, PIDFD_THREAD), kernel 6.9+). This file
// picks that live thread, in one place, for everything that needs one.
// Kernel: any (the thread pidfd: 6.9+, needed only when the leader has exited).
// Capability: none beyond reading /proc.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit

public enum ThreadGroup {
    /// True when thread `tid` of `pid` runs (is neither a zombie nor dead).
    /// `tid == pid` asks about the leader.
    static func isLive(_ tid: Int32, of pid: Int32) -> Bool {
        !Freezer.isExiting(tid, pid: pid)
    }

    /// A live thread of process `pid`: the leader itself while it runs,
    /// otherwise the lowest live thread id. Nil when no thread runs (the
    /// process exited, or is a zombie as a whole).
    public static func liveThread(of pid: Int32) -> Int32? {
        if isLive(pid, of: pid) { return pid }
        guard let tids = Ptrace.threads(of: pid) else { return nil }
        return tids.sorted().first { $0 != pid && isLive($0, of: pid) }
    }

    /// True when the leader of `pid` has exited while other threads run on.
    public static func leaderHasExited(_ pid: Int32) -> Bool {
        guard let live = liveThread(of: pid) else { return false }
        return live != pid
    }

    /// The /proc directory through which the memory of `pid` is seen:
    /// `/proc/PID` while the leader runs, `/proc/PID/task/TID` of a live
    /// thread once it has exited (the leader's own files are empty then).
    public static func procDirectory(of pid: Int32) -> String {
        guard let live = liveThread(of: pid), live != pid else { return "/proc/\(pid)" }
        return "/proc/\(pid)/task/\(live)"
    }

    /// Opens the /proc file `name` (maps, mem, pagemap...) of `pid` through
    /// `procDirectory(of:)`; returns the descriptor (-1 with errno set on
    /// failure) and the path opened, for messages. When the live thread it
    /// picked ends between the choice and the open, it picks again: that is
    /// no failure of the process. (An open file holds the memory, not the
    /// thread, so it stays good when its thread exits later.)
    public static func openProcFile(_ name: String, of pid: Int32, flags: Int32) -> (fd: Int32, path: String) {
        var path = procDirectory(of: pid) + "/" + name
        for _ in 0..<8 {
            let fd = open(path, flags | O_CLOEXEC)
            if fd >= 0 { return (fd, path) }
            let error = errno
            guard error == ENOENT || error == ESRCH else { return (fd, path) }
            let again = procDirectory(of: pid) + "/" + name
            if again == path { errno = error; return (fd, path) }
            path = again
        }
        return (open(path, flags | O_CLOEXEC), path)
    }

    /// Copies descriptor `remoteFD` of process `pid` into this process:
    /// through the process's pidfd while its leader runs, else through a
    /// thread pidfd of `tid`, a live thread of it (the leader's descriptor
    /// table is gone once it exited). Returns our descriptor, or the step
    /// that failed and its errno.
    static func copyDescriptor(_ remoteFD: Int32, of pid: Int32, through tid: Int32) -> Result<Int32, SystemError> {
        let viaThread = tid != pid && !isLive(pid, of: pid)
        // PIDFD_THREAD is O_EXCL (include/uapi/linux/pidfd.h, kernel 6.9+).
        let pidfd = viaThread ? ferry_pidfd_open(tid, UInt32(O_EXCL)) : ferry_pidfd_open(pid, 0)
        if pidfd < 0 {
            let hint = viaThread && errno == EINVAL
                ? "the main thread of pid \(pid) has exited, and reaching its descriptors through thread \(tid) needs kernel 6.9 or newer (PIDFD_THREAD)"
                : nil
            return .failure(SystemError(operation: "pidfd_open", target: viaThread ? "thread \(tid) of pid \(pid)" : "pid \(pid)",
                                        errno: errno, hint: hint))
        }
        defer { close(pidfd) }
        let local = ferry_pidfd_getfd(pidfd, remoteFD, 0)
        if local < 0 {
            return .failure(SystemError(operation: "pidfd_getfd", target: viaThread ? "thread \(tid) of pid \(pid)" : "pid \(pid)",
                                        errno: errno))
        }
        return .success(local)
    }
}
