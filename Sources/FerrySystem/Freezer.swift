// Freezing and thawing every thread of a process with ptrace.
//
// Why ptrace and not SIGSTOP or the cgroup freezer: SIGSTOP is visible to the
// process's parent and to the process (and may already be in effect), and the
// cgroup freezer needs the process in a cgroup of its own. PTRACE_SEIZE +
// PTRACE_INTERRUPT stops a thread without sending it any signal, and
// PTRACE_DETACH lets it go exactly as it was:
// - a process that was group-stopped (state T) before the freeze is stopped
//   again by the kernel on detach;
// - a thread caught about to take a signal (signal-delivery-stop) is
//   detached with that signal and its original siginfo, so nothing is lost
//   and nothing is invented; signals that arrive during the freeze stay
//   pending in the kernel and are taken after thaw.
// Threads created while freezing are caught by re-listing /proc/PID/task
// after every known thread has stopped, until a listing shows nothing new:
// a stopped thread cannot create threads, so the loop ends.
// Kernel: 3.4+. Capability: as Ptrace.swift.
#if canImport(Glibc)
import Glibc
import FerryToolkit
#endif

/// The stopped threads of one frozen process. Used only on its `PtraceThread`.
struct FrozenProcess: Sendable {
    let pid: Int32
    /// Every traced thread and how it stopped.
    var threads: [Int32: TraceeStop]
    /// From the first PTRACE_SEIZE to the last thread reporting its stop.
    var latency: Duration

    /// Threads caught about to take a signal (handed back to them on thaw).
    var signalStops: Int {
        threads.values.reduce(0) { count, stop in
            if case .signal = stop { return count + 1 }
            return count
        }
    }
}

enum FreezeError: Error, CustomStringConvertible, Sendable {
    case processGone(pid: Int32)
    case system(SystemError)

    var description: String {
        switch self {
        case .processGone(let pid): return "cannot freeze pid \(pid): the process exited"
        case .system(let error): return "cannot freeze: \(error)"
        }
    }
}

enum Freezer {
    /// True when thread `tid` is a zombie or already gone: PTRACE_SEIZE
    /// refuses such threads with EPERM, which is then no permission problem.
    static func isExiting(_ tid: Int32, pid: Int32) -> Bool {
        let path = "/proc/\(pid)/task/\(tid)/stat"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let count = read(fd, &buffer, buffer.count)
        guard count > 0, let close = buffer[0..<count].lastIndex(of: UInt8(ascii: ")")),
              close + 2 < count else { return true }
        let state = buffer[close + 2]
        return state == UInt8(ascii: "Z") || state == UInt8(ascii: "X") || state == UInt8(ascii: "x")
    }

    /// Stops every thread of `pid`. Call on the process's `PtraceThread`.
    /// On failure every thread already stopped is released again.
    static func freeze(pid: Int32) throws -> FrozenProcess {
        let clock = ContinuousClock()
        let started = clock.now
        var stops: [Int32: TraceeStop] = [:]
        var seized: Set<Int32> = []
        var attached: Set<Int32> = []
        do {
            while true {
                guard let listed = Ptrace.threads(of: pid), !listed.isEmpty else {
                    throw FreezeError.processGone(pid: pid)
                }
                let fresh = listed.filter { !seized.contains($0) }
                if fresh.isEmpty { break }
                // Seize and interrupt all new threads first, then wait for them:
                // the stops then happen in parallel instead of one after another.
                var interrupted: [Int32] = []
                for tid in fresh {
                    seized.insert(tid)
                    do {
                        try Ptrace.seize(tid, pid: pid)
                        attached.insert(tid)
                        try Ptrace.interrupt(tid, pid: pid)
                        interrupted.append(tid)
                    } catch let error as SystemError where error.errno == ESRCH {
                        continue // the thread exited between listing and seizing
                    } catch let error as SystemError where error.errno == EPERM && Self.isExiting(tid, pid: pid) {
                        continue // an exiting thread cannot be traced, and will never run again
                    }
                }
                // The leader last, by polling: it may be exiting, and a
                // leader that turns zombie while others run is never waitable
                // (Ptrace.waitLeaderStop). By then it has usually stopped.
                for tid in interrupted.filter({ $0 != pid }) + interrupted.filter({ $0 == pid }) {
                    let waited = tid == pid ? try Ptrace.waitLeaderStop(pid) : try Ptrace.waitStop(tid, pid: pid)
                    switch waited {
                    case .stopped(let stop): stops[tid] = stop
                    case .gone: break
                    }
                }
            }
            if stops.isEmpty { throw FreezeError.processGone(pid: pid) }
        } catch {
            for (tid, stop) in stops { try? Ptrace.detach(tid, pid: pid, stop: stop) }
            // Threads seized but not yet reported: detach fails with ESRCH until
            // they stop, so wait for their stop first.
            for tid in attached where stops[tid] == nil {
                let waited = tid == pid ? try? Ptrace.waitLeaderStop(pid) : try? Ptrace.waitStop(tid, pid: pid)
                if case .stopped(let stop) = waited ?? .gone {
                    try? Ptrace.detach(tid, pid: pid, stop: stop)
                }
            }
            if let error = error as? SystemError { throw FreezeError.system(error) }
            throw error
        }
        return FrozenProcess(pid: pid, threads: stops, latency: clock.now - started)
    }

    /// Releases every thread. Call on the same `PtraceThread` as `freeze`.
    static func thaw(_ frozen: FrozenProcess) throws {
        var firstError: Error?
        for (tid, stop) in frozen.threads {
            do { try Ptrace.detach(tid, pid: frozen.pid, stop: stop) } catch {
                if firstError == nil { firstError = error }
            }
        }
        if let firstError { throw firstError }
    }
}
