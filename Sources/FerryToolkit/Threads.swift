// Dedicated OS threads, for loops that block in poll(2), ptrace or a
// condition wait and must not hold one of the few threads of Swift's
// cooperative pool. Every thread Ferry starts is started here.
#if canImport(Glibc)
import Glibc
#endif

/// Starts a dedicated OS thread running `body`: for loops that block in
/// poll(2) or ptrace and must not hold a Swift concurrency thread.
/// `target` names what the thread serves, for the error.
public func startThread(for target: String, _ body: @escaping () -> Void) throws -> pthread_t {
    final class Body {
        let run: () -> Void
        init(_ run: @escaping () -> Void) { self.run = run }
    }
    var thread = pthread_t()
    let context = Unmanaged.passRetained(Body(body)).toOpaque()
    let result = pthread_create(&thread, nil, { argument in
        // SAFETY: `argument` is the Body retained above, released here exactly once.
        Unmanaged<Body>.fromOpaque(argument!).takeRetainedValue().run()
        return nil
    }, context)
    if result != 0 {
        Unmanaged<Body>.fromOpaque(context).release()
        throw SystemError(operation: "pthread_create", target: target, errno: result)
    }
    return thread
}

/// A thread started by `startThread`, for code outside this module: long
/// blocking work (file I/O and hashing of megabytes) that must not hold a
/// Swift concurrency thread. Join it exactly once.
/// (A pthread_t is a plain id on Linux, so this is plainly Sendable.)
public struct DedicatedThread: Sendable {
    private let thread: pthread_t

    /// Starts `body` on a new thread; `target` names what it serves, for the error.
    public init(for target: String, _ body: @escaping () -> Void) throws {
        thread = try startThread(for: target, body)
    }

    /// Waits for the thread's body to return.
    public func join() {
        pthread_join(thread, nil)
    }
}

/// Runs blocking `body` (hashing or reading megabytes) on a thread of its
/// own and waits for its result without holding a Swift concurrency thread.
public func runOnDedicatedThread<T: Sendable>(for target: String,
                                              _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        do {
            let thread = try startThread(for: target) { continuation.resume(with: Result { try body() }) }
            pthread_detach(thread)
        } catch {
            continuation.resume(throwing: error)
        }
    }
}
