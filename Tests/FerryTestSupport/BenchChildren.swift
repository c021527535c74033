// The children a benchmark starts (seeders, leechers, relays, workloads),
// killed even when the benchmark is interrupted: a frozen 1 GiB workload
// must not outlive it. The signal handler may only read memory and call
// kill(2) and unlink(2), so the pids sit in a fixed C array.
import Glibc

public enum BenchChildren {
    /// At most this many children alive at once.
    public static let capacity = 16
    nonisolated(unsafe) private static let pids = UnsafeMutablePointer<pid_t>.allocate(capacity: capacity)
    nonisolated(unsafe) private static var count = 0
    /// A file (the secret) the handler removes, as a C string.
    nonisolated(unsafe) private static var fileToRemove: UnsafeMutablePointer<CChar>? = nil

    /// Starts a child and registers it. Main thread only.
    public static func spawn(_ path: String, _ arguments: [String]) throws -> ChildProcess {
        let child = try ChildProcess(path, arguments)
        track(child.pid)
        return child
    }

    /// Registers a child started elsewhere. Main thread only.
    public static func track(_ pid: pid_t) {
        precondition(count < capacity, "more children than the handler's table holds")
        pids[count] = pid
        count += 1
    }

    /// Kills and reaps `children` (ChildProcess.stop is idempotent) and forgets them.
    public static func finish(_ children: [ChildProcess?]) {
        for child in children.compactMap({ $0 }) {
            child.stop()
            for i in 0..<count where pids[i] == child.pid {
                pids[i] = pids[count - 1]
                count -= 1
                break
            }
        }
    }

    /// The handler also removes `path` (the benchmark's secret file).
    public static func removeOnInterrupt(_ path: String) {
        fileToRemove = strdup(path)
    }

    /// On SIGINT, SIGTERM or SIGHUP: kill every child, remove the file, exit 128 + signal.
    public static func killOnInterrupt() {
        for signalNumber in [SIGINT, SIGTERM, SIGHUP] {
            signal(signalNumber) { number in
                for i in 0..<BenchChildren.count { kill(BenchChildren.pids[i], SIGKILL) }
                if let path = BenchChildren.fileToRemove { unlink(path) }
                _exit(128 + number)
            }
        }
    }
}
