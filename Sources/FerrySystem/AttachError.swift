// Why attaching to a process failed, in words a person can act on: what
// failed, on which pid, and what to do.
#if canImport(Glibc)
import Glibc
import FerryToolkit
#endif

public enum AttachError: Error, CustomStringConvertible, Sendable {
    /// The pid is zero or negative.
    case invalidPid(pid: Int32)
    /// No process has this pid.
    case noSuchProcess(pid: Int32)
    /// The pid belongs to us.
    case ownProcess(pid: Int32)
    /// The pid is a kernel thread: it has no user memory.
    case kernelThread(pid: Int32, name: String)
    /// The pid is a thread of another process, not a process. `leaderExited`:
    /// that process's main thread has exited (its other threads run on).
    case notThreadGroupLeader(pid: Int32, process: Int32, leaderExited: Bool = false)
    /// ptrace or pidfd_getfd was refused.
    case permissionDenied(pid: Int32, operation: String)
    /// Another tracer (a debugger, strace, another seeder) holds the process.
    case alreadyTraced(pid: Int32, tracer: Int32)
    /// The kernel has no userfaultfd system call.
    case noUserfaultfd
    /// The kernel's userfaultfd cannot write-protect.
    case noWriteProtect
    /// The requested tracker needs a kernel feature this kernel lacks.
    case trackerUnavailable(TrackerKind, reason: String)
    /// The soft-dirty tracker on a kernel built without CONFIG_MEM_SOFT_DIRTY.
    case softDirtyUnsupported(pid: Int32)
    /// The target itself refused to create a userfaultfd.
    case userfaultfdRefused(pid: Int32, errno: Int32)
    /// The process exited while we were attaching.
    case processExited(pid: Int32)
    /// Another system step failed.
    case system(pid: Int32, step: String, underlying: String)

    public var description: String {
        switch self {
        case .invalidPid(let pid):
            return "cannot attach to pid \(pid): not a valid process id (pass the pid of a running process, greater than 0)"
        case .noSuchProcess(let pid):
            return "cannot attach to pid \(pid): no such process (check the pid; the process may have exited)"
        case .ownProcess(let pid):
            return "cannot attach to pid \(pid): that is this process itself (a process cannot trace itself; run the seeder as a separate process)"
        case .kernelThread(let pid, let name):
            return "cannot attach to pid \(pid) (\(name)): it is a kernel thread with no user memory (pick a user-space process)"
        case .notThreadGroupLeader(let pid, let process, let leaderExited):
            if leaderExited {
                return "cannot attach to pid \(pid): it is a thread of process \(process), whose main thread has exited (attach to pid \(process) instead: Ferry reaches its memory through the threads still running)"
            }
            return "cannot attach to pid \(pid): it is a thread of process \(process) (attach to pid \(process) instead)"
        case .permissionDenied(let pid, let operation):
            return "cannot trace pid \(pid): \(operation): operation not permitted (run as root or grant CAP_SYS_PTRACE; check kernel.yama.ptrace_scope)"
        case .alreadyTraced(let pid, let tracer):
            return "cannot attach to pid \(pid): it is already traced by pid \(tracer) (detach the debugger, strace or other seeder first)"
        case .noUserfaultfd:
            return "cannot track writes: this kernel has no userfaultfd (build it with CONFIG_USERFAULTFD, kernel 5.7 or newer)"
        case .noWriteProtect:
            return "cannot track writes: this kernel's userfaultfd has no write-protect support (needs kernel 5.7+ with CONFIG_HAVE_ARCH_USERFAULTFD_WP)"
        case .trackerUnavailable(let kind, let reason):
            return "cannot use the \(kind.rawValue) tracker: \(reason) (choose another with --tracker, or omit it to use the best available)"
        case .softDirtyUnsupported(let pid):
            return "cannot use the soft-dirty tracker on pid \(pid): this kernel is built without CONFIG_MEM_SOFT_DIRTY (use --tracker async or sync)"
        case .userfaultfdRefused(let pid, let errno):
            var text = "cannot create a userfaultfd inside pid \(pid): \(SystemError.text(errno))"
            if errno == EPERM {
                text += " (the process lacks CAP_SYS_PTRACE and vm.unprivileged_userfaultfd is 0; set it to 1 or run the process as root)"
            }
            return text
        case .processExited(let pid):
            return "cannot attach to pid \(pid): the process exited while attaching"
        case .system(let pid, let step, let underlying):
            return "cannot attach to pid \(pid): \(step) failed: \(underlying)"
        }
    }
}

/// Why an operation on an attached `TrackedProcess` failed.
public enum TrackedProcessError: Error, CustomStringConvertible, Sendable {
    /// The process exited (or is a zombie): its memory is gone.
    case processExited(pid: Int32, operation: String)
    /// `detach()` was called before.
    case detached(pid: Int32, operation: String)
    /// Any other failure, with the underlying error's message.
    case failed(pid: Int32, operation: String, underlying: String)

    public var description: String {
        switch self {
        case .processExited(let pid, let operation):
            return "cannot \(operation) pid \(pid): the process has exited (its memory is gone; start again with a running process)"
        case .detached(let pid, let operation):
            return "cannot \(operation) pid \(pid): it was detached (attach to it again)"
        case .failed(let pid, let operation, let underlying):
            return "cannot \(operation) pid \(pid): \(underlying)"
        }
    }
}
