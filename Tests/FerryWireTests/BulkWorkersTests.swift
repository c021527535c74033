// The low-priority workers that seal and open large records.
import Testing
import Glibc
import Synchronization
@testable import FerryWire

@Suite struct BulkWorkersTests {
    @Test func runsEveryJobOnALowerPriorityThreadAndReturnsItsResult() async {
        let workers = BulkWorkers(threads: 2, nice: 1)
        errno = 0
        let ours = getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)
        let results = await withTaskGroup(of: (Int, Int32).self) { group in
            for i in 0..<64 {
                group.addTask {
                    await workers.run { (i * i, getpriority(__priority_which_t(PRIO_PROCESS.rawValue), 0)) }
                }
            }
            var all: [(Int, Int32)] = []
            for await r in group { all.append(r) }
            return all
        }
        #expect(results.map(\.0).sorted() == (0..<64).map { $0 * $0 })
        // Linux keeps nice per thread: the workers yield to this (test) thread's priority.
        #expect(results.allSatisfy { $0.1 == min(19, ours + 1) }, "\(Set(results.map(\.1))) vs ours \(ours)")
    }

    @Test func jobsRunConcurrentlyOnSeveralThreads() async {
        final class Overlap: Sendable {
            let inside = Mutex(0)
            let most = Mutex(0)
        }
        let workers = BulkWorkers(threads: 2, nice: 0)
        let overlap = Overlap()
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    await workers.run {
                        let now = overlap.inside.withLock { $0 += 1; return $0 }
                        overlap.most.withLock { $0 = max($0, now) }
                        usleep(20_000)
                        overlap.inside.withLock { $0 -= 1 }
                    }
                }
            }
        }
        #expect(overlap.most.withLock { $0 } == 2, "two threads: two jobs at once, never more")
    }
}
