// Bytes one connection may hold for the requests it is answering. A ReadAt
// holds a page buffer and a built part (about 2 MiB) from the moment it
// reads until the part is handed to a connection that may not be reading:
// with 1,024 requests in flight a peer that stops reading could pin 2 GiB.
// Each ReadAt takes its share of the budget before it reads anything, and
// gives it back when it is done; the rest wait, holding only their request.
import Synchronization

final class ByteBudget: Sendable {
    private struct Waiter {
        let id: UInt64
        let bytes: Int
        let continuation: CheckedContinuation<Void, any Error>
    }
    private struct State {
        var available: Int
        var waiters: [Waiter] = []
        var nextID: UInt64 = 0
    }
    private let state: Mutex<State>
    let capacity: Int

    init(bytes: Int) {
        capacity = bytes
        state = Mutex(State(available: bytes))
    }

    /// Bytes taken now.
    var inUse: Int { capacity - state.withLock { $0.available } }

    /// Waits until `bytes` (at most the capacity) are free and takes them, in
    /// arrival order. Throws CancellationError if the task is cancelled first.
    func acquire(_ bytes: Int) async throws {
        let bytes = min(bytes, capacity)
        let id = state.withLock { s -> UInt64 in s.nextID += 1; return s.nextID }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let granted = state.withLock { s -> Bool? in
                    if Task.isCancelled { return nil }
                    if s.waiters.isEmpty && s.available >= bytes {
                        s.available -= bytes
                        return true
                    }
                    s.waiters.append(Waiter(id: id, bytes: bytes, continuation: continuation))
                    return false
                }
                switch granted {
                case true?: continuation.resume()
                case nil: continuation.resume(throwing: CancellationError())
                case false?: break
                }
            }
        } onCancel: {
            let removed = state.withLock { s -> Waiter? in
                guard let index = s.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return s.waiters.remove(at: index)
            }
            removed?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Gives back what `acquire` took and wakes the waiters that now fit.
    func release(_ bytes: Int) {
        let bytes = min(bytes, capacity)
        let ready = state.withLock { s -> [Waiter] in
            s.available += bytes
            var ready: [Waiter] = []
            while let first = s.waiters.first, first.bytes <= s.available {
                s.available -= first.bytes
                ready.append(s.waiters.removeFirst())
            }
            return ready
        }
        for waiter in ready { waiter.continuation.resume() }
    }

    /// Runs `body` holding `bytes` of the budget.
    func withBytes<T>(_ bytes: Int, _ body: () async throws -> T) async throws -> T {
        try await acquire(bytes)
        defer { release(bytes) }
        return try await body()
    }
}
