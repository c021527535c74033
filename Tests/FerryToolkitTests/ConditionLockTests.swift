import Testing
import Glibc
import FerryToolkit

@Suite struct ConditionLockTests {
    @Test func waitReturnsOnceAnotherThreadMakesItReady() throws {
        let lock = ConditionLock(0)
        let thread = try DedicatedThread(for: "the test") {
            usleep(20_000)
            lock.withLockThenBroadcast { $0 = 42 }
        }
        let seen = lock.wait(until: { $0 != 0 }) { $0 }
        #expect(seen == 42)
        thread.join()
    }

    @Test func waitTimesOut() {
        let lock = ConditionLock(false)
        let start = ContinuousClock.now
        let result = lock.wait(until: { $0 }, timeout: .milliseconds(50)) { _ in true }
        #expect(result == nil)
        #expect(ContinuousClock.now - start >= .milliseconds(50))
    }

    @Test func readyValueNeedsNoWait() {
        let lock = ConditionLock(1)
        #expect(lock.wait(until: { $0 == 1 }, timeout: .zero) { value -> Int in value += 1; return value } == 2)
        #expect(lock.withLock { $0 } == 2)
    }

    @Test func broadcastWakesEveryWaiter() throws {
        let lock = ConditionLock((open: false, woken: 0))
        let threads = try (0..<4).map { _ in
            try DedicatedThread(for: "a waiter") {
                _ = lock.wait(until: { $0.open }) { $0.woken += 1 }
            }
        }
        usleep(20_000)
        lock.withLockThenBroadcast { $0.open = true }
        for thread in threads { thread.join() }
        #expect(lock.withLock { $0.woken } == 4)
    }

    @Test func signalWakesOneWaiterAtATime() throws {
        let lock = ConditionLock((tokens: 0, taken: 0))
        let threads = try (0..<3).map { _ in
            try DedicatedThread(for: "a worker") {
                _ = lock.wait(until: { $0.tokens > 0 }) { state in state.tokens -= 1; state.taken += 1 }
            }
        }
        for _ in 0..<3 { lock.withLockThenSignal { $0.tokens += 1 } }
        for thread in threads { thread.join() }
        #expect(lock.withLock { $0.taken } == 3)
    }
}
