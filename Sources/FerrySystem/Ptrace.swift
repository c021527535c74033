// ptrace: the one kernel facility that can stop every thread of a foreign
// process and run code in it.
//
// Why a dedicated thread: the kernel binds a tracee to the *thread* that
// attached it (not the process), every later ptrace request must come from
// that same thread, and when that thread exits the kernel detaches its
// tracees. Swift code may hop between threads, so all ptrace requests of one
// TrackedProcess run on one `PtraceThread` that lives as long as it does.
// Kernel: PTRACE_SEIZE / PTRACE_INTERRUPT need 3.4+. Capability: PTRACE_MODE_ATTACH
// over the target (same user without Yama restrictions, or root / CAP_SYS_PTRACE).
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

/// A dedicated OS thread that runs submitted closures one at a time, in order.
/// Plainly `Sendable`: the queue lives in a `ConditionLock`, the thread id is
/// a constant.
final class PtraceThread: Sendable {
    /// One submitted closure and its outcome. The submitter waits on it
    /// until the worker sets `finished`.
    private struct Job {
        /// Taken by the worker before it runs it: the closure must not
        /// outlive `run`'s `withoutActuallyEscaping`.
        var body: (() throws -> Void)?
        var error: Error?
        var finished = false
    }

    private struct Queue {
        var jobs: [ConditionLock<Job>] = []
        var stopping = false
    }

    private let queue: ConditionLock<Queue>
    private let thread: pthread_t

    init() throws {
        let queue = ConditionLock(Queue())
        self.queue = queue
        thread = try startThread(for: "the ptrace thread") { Self.loop(queue) }
        pthread_detach(thread)
    }

    private var isCurrent: Bool { pthread_equal(pthread_self(), thread) != 0 }

    /// Runs `body` on the ptrace thread and returns its result; blocks the caller.
    func run<T>(_ body: () throws -> T) throws -> T {
        if isCurrent { return try body() }
        return try withoutActuallyEscaping(body) { body in
            var result: T?
            let job = ConditionLock(Job(body: { result = try body() }))
            queue.withLockThenBroadcast { $0.jobs.append(job) }
            if let error = job.wait(until: \.finished, then: { $0.error })! { throw error }
            return result!
        }
    }

    /// Ends the thread after the jobs already queued. Tracees still attached
    /// are detached by the kernel when the thread exits.
    func stop() {
        queue.withLockThenBroadcast { $0.stopping = true }
    }

    /// The ids of the ptrace threads running now, for `onPtraceThread`.
    private static let running = Mutex(Set<pthread_t>())

    /// True on a `PtraceThread`: the kernel answers ptrace requests only
    /// from the thread that attached, so `Ptrace` asserts this.
    static var onPtraceThread: Bool { running.withLock { $0.contains(pthread_self()) } }

    private static func loop(_ queue: ConditionLock<Queue>) {
        running.withLock { _ = $0.insert(pthread_self()) }
        defer { running.withLock { _ = $0.remove(pthread_self()) } }
        while true {
            let next = queue.wait(until: { !$0.jobs.isEmpty || $0.stopping }) { queue in
                queue.jobs.isEmpty ? nil : queue.jobs.removeFirst()
            }!
            // Empty and stopping: every queued job ran.
            guard let job = next else { return }
            var body = job.withLock { job in
                defer { job.body = nil }
                return job.body
            }
            var error: Error?
            do { try body?() } catch let failure { error = failure }
            body = nil
            job.withLockThenBroadcast { job in
                job.error = error
                job.finished = true
            }
        }
    }
}

/// How a traced thread is stopped, which decides how it is released.
enum TraceeStop: Sendable {
    /// An interrupt or group stop (PTRACE_EVENT_STOP). `signal` is SIGTRAP for
    /// our interrupt, or the stop signal when the process was stopped (group stop);
    /// the kernel restores a group stop by itself on detach.
    case event(signal: Int32)
    /// The thread was about to take a signal when it stopped
    /// (signal-delivery-stop): it must be handed back on detach, with its siginfo.
    case signal(Int32, siginfo_t)
}

/// What waiting for a traced thread produced.
enum TraceeWait {
    case stopped(TraceeStop)
    /// The thread exited or was killed; it is no longer traced.
    case gone
}

/// Thin, error-naming wrappers over ptrace(2) and waitpid(2). Call only on the `PtraceThread`.
enum Ptrace {
    static func seize(_ tid: Int32, pid: Int32) throws {
        assert(PtraceThread.onPtraceThread, "ptrace requests run on the ptrace thread")
        try checkedCall("PTRACE_SEIZE", on: "thread \(tid) of pid \(pid)", hint: { errno in
            errno == EPERM ? "run as root or grant CAP_SYS_PTRACE; the process may already be traced" : nil
        }) { ferry_ptrace_seize(tid, 0) }
    }

    static func interrupt(_ tid: Int32, pid: Int32) throws {
        assert(PtraceThread.onPtraceThread, "ptrace requests run on the ptrace thread")
        try checkedCall("PTRACE_INTERRUPT", on: "thread \(tid) of pid \(pid)") { ferry_ptrace_interrupt(tid) }
    }

    /// Releases `tid`, handing back a signal it was about to take.
    static func detach(_ tid: Int32, pid: Int32, stop: TraceeStop) throws {
        assert(PtraceThread.onPtraceThread, "ptrace requests run on the ptrace thread")
        var signal: Int32 = 0
        if case .signal(let number, var info) = stop {
            // Restore the original siginfo: after a remote syscall the thread
            // sits in a SIGTRAP stop whose siginfo is the step's.
            _ = ferry_ptrace_setsiginfo(tid, &info)
            signal = number
        }
        let result = ferry_ptrace_detach(tid, signal)
        if result < 0 && errno != ESRCH {
            throw SystemError(operation: "PTRACE_DETACH", target: "thread \(tid) of pid \(pid)", errno: errno)
        }
    }

    /// Waits until `tid` reports a stop or ends.
    static func waitStop(_ tid: Int32, pid: Int32) throws -> TraceeWait {
        assert(PtraceThread.onPtraceThread, "only the tracer may wait for its tracees")
        var status: Int32 = 0
        _ = try checkedCall("waitpid", on: "thread \(tid) of pid \(pid)") {
            waitpid(tid, &status, ferry_wall())
        }
        return try decode(status, tid: tid)
    }

    /// Waits for the stop of the leader `pid`, which may be exiting: a
    /// leader that becomes a zombie while other threads run on reports
    /// neither a stop nor its exit (the kernel delays a group leader's exit
    /// until the group is empty), so a blocking wait would never return.
    /// Polls instead, and answers `.gone` once the leader is a zombie.
    static func waitLeaderStop(_ pid: Int32) throws -> TraceeWait {
        assert(PtraceThread.onPtraceThread, "only the tracer may wait for its tracees")
        var status: Int32 = 0
        while true {
            let waited = try checkedCall("waitpid", on: "the leader of pid \(pid)") {
                waitpid(pid, &status, ferry_wall() | WNOHANG)
            }
            if waited == pid { return try decode(status, tid: pid) }
            if Freezer.isExiting(pid, pid: pid) {
                // Still traced, but it never runs again: the kernel lets go of
                // it when our ptrace thread ends (or it is reaped).
                return .gone
            }
            // The stop is normally microseconds away: a short pause, no spin.
            var pause = timespec(tv_sec: 0, tv_nsec: 20_000)
            nanosleep(&pause, nil)
        }
    }

    private static func decode(_ status: Int32, tid: Int32) throws -> TraceeWait {
        if ferry_wifexited(status) != 0 || ferry_wifsignaled(status) != 0 { return .gone }
        guard ferry_wifstopped(status) != 0 else { return .gone }
        let signal = ferry_wstopsig(status)
        if ferry_wptrace_event(status) != 0 { return .stopped(.event(signal: signal)) }
        var info = siginfo_t()
        if ferry_ptrace_getsiginfo(tid, &info) < 0 {
            // A stop without siginfo is a group stop of an attached tracee.
            return .stopped(.event(signal: signal))
        }
        return .stopped(.signal(signal, info))
    }

    /// Thread ids in /proc/PID/task, or nil when the process is gone.
    static func threads(of pid: Int32) -> [Int32]? {
        guard let dir = opendir("/proc/\(pid)/task") else { return nil }
        defer { closedir(dir) }
        var tids: [Int32] = []
        while let entry = readdir(dir) {
            // SAFETY: d_name is a NUL-terminated array inside the dirent readdir returned.
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if let tid = Int32(name) { tids.append(tid) }
        }
        return tids
    }
}
