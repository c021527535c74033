// Requests for the same thing share one flight: the first caller for a key
// starts the work, callers that come while it runs wait for its result (or
// its error), and once it ends the key is free again, so a later call runs
// the work anew. The work runs in a task of its own: a waiter that is
// cancelled stops waiting at once, without cancelling the work for the
// others. `Latch` is the one-shot value the waiters wait on; it also serves
// on its own wherever a task waits for something to happen once.
import Synchronization

/// A value set once, which any number of tasks wait for.
final class Latch<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiters: [UInt64: CheckedContinuation<Value, any Error>] = [:]
        var nextID: UInt64 = 0
    }
    private let state = Mutex(State())

    init() {}

    /// The value, once set.
    var value: Value? { state.withLock { $0.value } }

    /// Sets the value and wakes every waiter; a second set is ignored.
    func set(_ value: Value) {
        let waiters = state.withLock { s -> [CheckedContinuation<Value, any Error>] in
            guard s.value == nil else { return [] }
            s.value = value
            defer { s.waiters = [:] }
            return Array(s.waiters.values)
        }
        for waiter in waiters { waiter.resume(returning: value) }
    }

    /// Waits for the value. Throws CancellationError if the waiting task is
    /// cancelled first; the value stays to come for the other waiters.
    func wait() async throws -> Value {
        let id = state.withLock { s -> UInt64 in
            s.nextID += 1
            return s.nextID
        }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Value, any Error>) in
                let now = state.withLock { s -> Result<Value, any Error>? in
                    if let value = s.value { return .success(value) }
                    // The cancellation handler may have run before this
                    // waiter was registered: it found nothing to resume.
                    if Task.isCancelled { return .failure(CancellationError()) }
                    s.waiters[id] = continuation
                    return nil
                }
                if let now { continuation.resume(with: now) }
            }
        } onCancel: {
            state.withLock { $0.waiters.removeValue(forKey: id) }?.resume(throwing: CancellationError())
        }
    }

    /// Waits at most `limit` for the value: nil when the limit passes first,
    /// or the waiting task is cancelled.
    func wait(limit: Duration) async -> Value? {
        await withTaskGroup(of: Value?.self) { group in
            group.addTask { try? await self.wait() }
            // A genuine timer: the caller's deadline, not a poll.
            group.addTask {
                try? await Task.sleep(for: limit)
                return nil
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
    }
}

/// Concurrent requests for the same key share one execution of the work.
final class SingleFlight<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    typealias Outcome = Result<Value, any Error>
    private let flights = Mutex<[Key: Latch<Outcome>]>([:])

    init() {}

    /// Runs `work` for `key`, or joins the run in flight for it; either way
    /// returns its value or throws its error.
    func run(_ key: Key, _ work: @escaping @Sendable () async throws -> Value) async throws -> Value {
        let (flight, started) = flights.withLock { f -> (Latch<Outcome>, Bool) in
            if let flight = f[key] { return (flight, false) }
            let flight = Latch<Outcome>()
            f[key] = flight
            return (flight, true)
        }
        if started { launch([key], flight, work) }
        return try await flight.wait().get()
    }

    /// Starts `work` for `key` unless a run for it is in flight, without
    /// waiting for it (`join` does). False when one was in flight already.
    @discardableResult
    func start(_ key: Key, _ work: @escaping @Sendable () async throws -> Value) -> Bool {
        let flight = flights.withLock { f -> Latch<Outcome>? in
            guard f[key] == nil else { return nil }
            let flight = Latch<Outcome>()
            f[key] = flight
            return flight
        }
        guard let flight else { return false }
        launch([key], flight, work)
        return true
    }

    /// For work that answers many keys at once (one upstream read answers
    /// many pages): joins the flights answering any of `keys`, and runs
    /// `work` once for each group of the keys no flight answers (`grouping`
    /// splits them). Returns the values of every flight waited for; throws
    /// the first error.
    @discardableResult
    func run(covering keys: [Key], grouping: ([Key]) -> [[Key]],
             _ work: @escaping @Sendable ([Key]) async throws -> Value) async throws -> [Value] {
        let (joined, started) = flights.withLock { f -> ([Latch<Outcome>], [([Key], Latch<Outcome>)]) in
            var joined: [Latch<Outcome>] = []
            var seen = Set<ObjectIdentifier>()
            var free: [Key] = []
            for key in keys {
                if let flight = f[key] {
                    if seen.insert(ObjectIdentifier(flight)).inserted { joined.append(flight) }
                } else {
                    free.append(key)
                }
            }
            var started: [([Key], Latch<Outcome>)] = []
            for group in grouping(free) where !group.isEmpty {
                let flight = Latch<Outcome>()
                for key in group { f[key] = flight }
                started.append((group, flight))
                joined.append(flight)
            }
            return (joined, started)
        }
        for (group, flight) in started { launch(group, flight) { try await work(group) } }
        var values: [Value] = []
        for flight in joined { values.append(try await flight.wait().get()) }
        return values
    }

    /// Waits for the run in flight for `key`: its value, or nil when none is in flight.
    func join(_ key: Key) async throws -> Value? {
        guard let flight = flights.withLock({ $0[key] }) else { return nil }
        return try await flight.wait().get()
    }

    private func launch(_ keys: [Key], _ flight: Latch<Outcome>, _ work: @escaping @Sendable () async throws -> Value) {
        Task {
            let outcome: Outcome
            do {
                outcome = .success(try await work())
            } catch {
                outcome = .failure(error)
            }
            // The keys are free before anyone learns the outcome: a call made
            // after this run returned starts a new one.
            flights.withLock { f in
                for key in keys where f[key] === flight { f[key] = nil }
            }
            flight.set(outcome)
        }
    }
}
