// The one place FerrySystem turns a failed system call into an error: retry
// EINTR, hand EAGAIN back as a value, and name the operation and its target
// in anything thrown (modelled on swift-nio's System.swift).
internal import CFerryLinux
#if canImport(Glibc)
import Glibc
#endif

/// A system call that failed, with what it was doing and to what.
public struct SystemError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The operation as a person would say it: "process_vm_readv", "UFFDIO_REGISTER".
    public var operation: String
    /// What it acted on: "pid 4242", "pid 4242 at 0x7f00...".
    public var target: String
    public var errno: Int32
    /// What to do about it, when there is something to say.
    public var hint: String?

    public init(operation: String, target: String, errno: Int32, hint: String? = nil) {
        self.operation = operation
        self.target = target
        self.errno = errno
        self.hint = hint
    }

    public var description: String {
        var text = "\(operation) on \(target) failed: \(String(cString: strerror(errno)))"
        if let hint { text += " (\(hint))" }
        return text
    }
}

/// The outcome of a call that may report "try again" without it being an error.
public enum CallResult<Value> {
    case done(Value)
    case wouldBlock
}

/// Runs `body` until it stops failing with EINTR. A negative result becomes a
/// `SystemError`; EAGAIN/EWOULDBLOCK comes back as `.wouldBlock`.
@discardableResult
public func systemCall<T: BinaryInteger>(
    _ operation: @autoclosure () -> String,
    on target: @autoclosure () -> String,
    hint: ((Int32) -> String?)? = nil,
    _ body: () -> T
) throws -> CallResult<T> {
    while true {
        let result = body()
        if result >= 0 { return .done(result) }
        let error = Glibc.errno
        if error == EINTR { continue }
        if error == EAGAIN || error == EWOULDBLOCK { return .wouldBlock }
        throw SystemError(operation: operation(), target: target(), errno: error, hint: hint?(error))
    }
}

/// Like `systemCall`, for calls where EAGAIN is an error too.
@discardableResult
public func checkedCall<T: BinaryInteger>(
    _ operation: @autoclosure () -> String,
    on target: @autoclosure () -> String,
    hint: ((Int32) -> String?)? = nil,
    _ body: () -> T
) throws -> T {
    while true {
        let result = body()
        if result >= 0 { return result }
        let error = Glibc.errno
        if error == EINTR { continue }
        throw SystemError(operation: operation(), target: target(), errno: error, hint: hint?(error))
    }
}

/// Keeps glibc from returning freed large buffers to the kernel after each
/// use (`mallopt` thresholds): for programs that move many 1 MiB frames.
public func tuneAllocatorForBulkBuffers() {
    ferry_tune_malloc_for_bulk()
}

/// Lowers the calling thread's scheduling priority (nice value), for
/// background work that must yield to latency-sensitive work on small hosts.
public func lowerCurrentThreadPriority(nice: Int32 = 10) {
    _ = ferry_nice_this_thread(nice)
}

/// Starts a dedicated OS thread running `body`: for loops that block in
/// poll(2) or ptrace and must not hold a Swift concurrency thread.
/// `target` names what the thread serves, for the error.
func startThread(for target: String, _ body: @escaping () -> Void) throws -> pthread_t {
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
public struct DedicatedThread: @unchecked Sendable {
    // `@unchecked Sendable` invariant: a pthread_t is an opaque id that any
    // thread may join; `join` is called once, by the owner.
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

/// Asks the scheduler for a `slice` (nil: the default) for every thread of
/// `pid`, and so for the threads they create later (kernel 6.12+; older
/// kernels ignore it). With a short slice a thread that wakes, such as one
/// whose post-copy page just landed, preempts a busy thread at once instead
/// of at the end of that thread's slice. Returns how many threads took it.
@discardableResult
public func setSchedulerSlice(_ slice: Duration?, threadsOf pid: Int32) -> Int {
    let nanoseconds = slice.map { UInt64(max(0, $0.components.seconds)) * 1_000_000_000 + UInt64(max(0, $0.components.attoseconds / 1_000_000_000)) } ?? 0
    guard let directory = opendir("/proc/\(pid)/task") else { return 0 }
    defer { closedir(directory) }
    var done = 0
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if let tid = Int32(name), ferry_set_slice(tid, nanoseconds) == 0 { done += 1 }
    }
    return done
}
