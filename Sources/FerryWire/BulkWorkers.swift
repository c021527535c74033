// Low-priority threads for the CPU-heavy part of bulk transfer: sealing and
// opening large records.
//
// Why: Swift's cooperative pool has one thread per core and runs jobs in
// arrival order, so a 4 KiB reply that a blocked program is waiting for (a
// post-copy touch, a Sync) queued behind every 256 KiB record being sealed
// or opened; measured on 2 cores, that made a touched page take 2-12x the
// idle round trip. Moving the AEAD work of large records to threads with a
// higher nice value leaves the pool free for small jobs, and lets the
// kernel preempt bulk work the moment any normal-priority thread wakes:
// the fault handler, the libuv loop, or the program itself. On an idle host
// the workers still get every core, so bulk throughput is unchanged; on a
// busy one, bulk transfer gives way to the programs running there, which is
// what a migration should do to the program it migrates.
//
// Environment, for measurements: FERRY_BULK_NICE=N sets the workers' nice
// increment (default 10; 0 = the caller's priority), FERRY_BULK_INLINE=1
// seals and opens every record on the calling task instead.
import Glibc
import FerryToolkit

/// A fixed set of low-priority threads running closures, awaited by async callers.
/// The queue lives in a `ConditionLock`; the other stored properties are immutable.
public final class BulkWorkers: Sendable {
    /// The process-wide workers: one per core, started on first use.
    public static let shared = BulkWorkers(threads: max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))),
                                           nice: getenv("FERRY_BULK_NICE").map { Int32(atoi($0)) } ?? 10)

    /// Records from this size up are sealed and opened here.
    public static let minimumBytes = getenv("FERRY_BULK_INLINE") != nil ? Int.max : 64 << 10

    private struct Queue {
        var jobs: [@Sendable () -> Void] = []
        var head = 0
        var started = false
    }
    /// Never destroyed while a worker runs: workers live as long as the
    /// process (their threads wait on it forever, holding this object), so
    /// make one `shared` per process; tests make a few more, which stay until exit.
    private let queue = ConditionLock(Queue())
    private let threads: Int
    private let nice: Int32

    /// `nice`: added to the threads' nice value (higher yields more).
    public init(threads: Int, nice: Int32) {
        self.threads = threads
        self.nice = nice
    }

    /// Runs `work` on a worker thread and returns its result.
    public func run<T: Sendable>(_ work: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            submit { continuation.resume(returning: work()) }
        }
    }

    private func submit(_ job: @escaping @Sendable () -> Void) {
        let start = queue.withLockThenSignal { queue in
            queue.jobs.append(job)
            defer { queue.started = true }
            return !queue.started
        }
        if start { startThreads() }
    }

    private func startThreads() {
        var running = 0
        for _ in 0..<threads {
            guard let thread = try? startThread(for: "a bulk worker", { [self] in work() }) else { continue }
            pthread_detach(thread)
            running += 1
        }
        // No thread at all (out of resources): callers must not hang, so the
        // job runs here, and the next submit tries to start threads again.
        if running == 0 {
            let pending = queue.withLock { queue in
                queue.started = false
                defer { queue.jobs.removeAll(); queue.head = 0 }
                return Array(queue.jobs[queue.head...])
            }
            for job in pending { job() }
        }
    }

    private func work() {
        // Linux keeps a nice value per thread; `who` 0 is the calling thread.
        let which = __priority_which_t(PRIO_PROCESS.rawValue)
        errno = 0
        let current = getpriority(which, 0)
        if errno == 0 { setpriority(which, 0, current + nice) }
        while true {
            let job = queue.wait(until: { $0.head < $0.jobs.count }) { queue in
                let job = queue.jobs[queue.head]
                queue.head += 1
                if queue.head == queue.jobs.count { queue.jobs.removeAll(keepingCapacity: true); queue.head = 0 }
                return job
            }!
            job()
        }
    }
}
