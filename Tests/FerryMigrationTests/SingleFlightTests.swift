// SingleFlight: concurrent requests for one key share one execution, its
// error reaches every waiter, a later request runs anew, and a cancelled
// waiter stops waiting without stopping the work for the others.
import Synchronization
import Testing
@testable import FerryMigration

@Suite struct SingleFlightTests {
    /// Counts runs of the work.
    final class Runs: Sendable {
        let count = Atomic<Int>(0)
        func add() { count.add(1, ordering: .relaxed) }
        var value: Int { count.load(ordering: .relaxed) }
    }

    struct Failure: Error, Equatable { let text: String }

    @Test func concurrentCallersShareOneExecution() async throws {
        let flight = SingleFlight<String, Int>()
        let runs = Runs()
        let gate = Latch<Void>()
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for _ in 0..<10 {
                group.addTask {
                    try await flight.run("page") {
                        runs.add()
                        try await gate.wait()
                        return 42
                    }
                }
            }
            // Every caller has joined before the work may end.
            try await Task.sleep(for: .milliseconds(200))
            gate.set(())
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results == Array(repeating: 42, count: 10))
        #expect(runs.value == 1)
    }

    @Test func anErrorReachesEveryWaiter() async throws {
        let flight = SingleFlight<Int, Int>()
        let runs = Runs()
        let gate = Latch<Void>()
        let errors = await withTaskGroup(of: Failure?.self) { group in
            for _ in 0..<5 {
                group.addTask {
                    do {
                        _ = try await flight.run(7) {
                            runs.add()
                            try await gate.wait()
                            throw Failure(text: "upstream gone")
                        }
                        return nil
                    } catch {
                        return error as? Failure
                    }
                }
            }
            try? await Task.sleep(for: .milliseconds(200))
            gate.set(())
            return await group.reduce(into: []) { $0.append($1) }
        }
        #expect(errors == Array(repeating: Failure(text: "upstream gone"), count: 5))
        #expect(runs.value == 1)
    }

    @Test func aLaterCallAfterCompletionRunsAgain() async throws {
        let flight = SingleFlight<Int, Int>()
        let runs = Runs()
        let first = try await flight.run(1) { runs.add(); return runs.value }
        let second = try await flight.run(1) { runs.add(); return runs.value }
        #expect(first == 1 && second == 2)
        #expect(runs.value == 2)
        // So does one after a failure.
        await #expect(throws: Failure.self) { try await flight.run(2) { throw Failure(text: "once") } }
        #expect(try await flight.run(2) { 5 } == 5)
    }

    @Test func aCancelledWaiterLeavesTheWorkToTheOthers() async throws {
        let flight = SingleFlight<Int, Int>()
        let runs = Runs()
        let gate = Latch<Void>()
        let work: @Sendable () async throws -> Int = {
            runs.add()
            try await gate.wait()
            return 9
        }
        let cancelled = Task { try await flight.run(1, work) }
        let patient = Task { try await flight.run(1, work) }
        try await Task.sleep(for: .milliseconds(100))
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        gate.set(())
        #expect(try await patient.value == 9)
        #expect(runs.value == 1)
    }

    @Test func oneFlightAnswersManyKeys() async throws {
        let flight = SingleFlight<UInt64, Int>()
        let runs = Runs()
        let gate = Latch<Void>()
        let batches: @Sendable ([UInt64]) -> [[UInt64]] = { keys in stride(from: 0, to: keys.count, by: 2).map { Array(keys.sorted()[$0..<min(keys.count, $0 + 2)]) } }
        let work: @Sendable ([UInt64]) async throws -> Int = { keys in
            runs.add()
            try await gate.wait()
            return keys.count
        }
        let first = Task { try await flight.run(covering: [1, 2, 3, 4], grouping: batches, work) }
        try await Task.sleep(for: .milliseconds(100))
        // Keys 3 and 4 are in flight already: only 5 and 6 start a flight.
        let second = Task { try await flight.run(covering: [3, 4, 5, 6], grouping: batches, work) }
        try await Task.sleep(for: .milliseconds(100))
        gate.set(())
        #expect(try await first.value == [2, 2])
        #expect(try await second.value == [2, 2])
        #expect(runs.value == 3)
        #expect(try await flight.join(1) == nil)
    }

    @Test func aLatchWaitEndsAtItsLimit() async {
        let latch = Latch<Int>()
        #expect(await latch.wait(limit: .milliseconds(50)) == nil)
        latch.set(3)
        latch.set(4)
        #expect(await latch.wait(limit: .seconds(5)) == 3)
    }
}
