// A libuv loop on its own thread. libuv is single-threaded: every handle is
// created, used and closed on the thread that runs its loop. Swift code on any
// other thread submits work through a locked queue and wakes the loop with a
// `uv_async_t`; results come back through continuations, so no Swift task ever
// blocks the loop thread and the loop thread never waits for Swift tasks.
//
// The process shares one loop (`EventLoop.shared`, created on first use and
// never shut down); tests may create their own and shut them down to check that
// every handle was closed.

internal import CUV
import Glibc
import Synchronization
import FerryToolkit

/// One libuv loop running on a dedicated thread.
/// `loop` and `wakeup` are touched only on the loop thread once `init`
/// returns, apart from `uv_async_send`, which libuv documents as thread-safe;
/// the cross-thread state is in `jobs`, a Mutex.
final class EventLoop: @unchecked Sendable {
    // `@unchecked Sendable` invariant: the libuv pointers are used on the loop thread only (plus the thread-safe uv_async_send).

    /// The process-wide loop used by `Transports`, `Listener` and `StdioTransport`.
    static let shared = EventLoop(name: "ferry-uv")

    let name: String
    // SAFETY: allocated in init, initialised by uv_loop_init, closed and freed
    // by the loop thread after uv_run returns (no handle is left by then).
    let loop: UnsafeMutablePointer<uv_loop_t>
    // SAFETY: initialised in init; closed on the loop thread by `shutdown`;
    // freed by the loop thread after uv_run returns.
    private let wakeup: UnsafeMutablePointer<uv_async_t>

    private struct Jobs {
        var queue: [@Sendable () -> Void] = []
        var stopping = false
        var stopped = false
        var exitWaiters: [CheckedContinuation<Void, Never>] = []
    }
    private let jobs = Mutex(Jobs())

    /// Size of the read buffer shared by this loop's streams.
    static let readBufferSize = 256 << 10
    // SAFETY: allocated in init, freed by the loop thread after uv_run
    // returns (no stream is left to read into it). Used only on the loop
    // thread, between one alloc callback and its read callback.
    let readBuffer: UnsafeMutableRawPointer
    private let threadID = Atomic<UInt>(0)

    init(name: String) {
        self.name = name
        loop = .allocate(capacity: 1)
        wakeup = .allocate(capacity: 1)
        readBuffer = .allocate(byteCount: Self.readBufferSize, alignment: 64)
        // A freshly allocated loop can only fail to initialise when the process
        // is out of file descriptors or memory; nothing can work then, so this
        // is a programming-environment error, not a runtime condition to handle.
        precondition(uv_loop_init(loop) == 0, "uv_loop_init failed: out of file descriptors or memory")
        precondition(uv_async_init(loop, wakeup, eventLoopWakeup) == 0, "uv_async_init failed")
        // Unretained: the loop thread's own retain (below) keeps `self` alive
        // for as long as the wakeup handle can fire.
        wakeup.pointee.data = Unmanaged.passUnretained(self).toOpaque()

        // The thread keeps the loop object alive until it exits. Without a
        // thread nothing can work, as above.
        do {
            let thread = try startThread(for: "the libuv loop \(name)") { [self] in threadMain() }
            pthread_detach(thread)
        } catch {
            preconditionFailure("cannot start the libuv loop thread: \(SystemError.text((error as? SystemError)?.errno ?? EAGAIN))")
        }
    }

    /// True on this loop's thread.
    var inLoopThread: Bool { threadID.load(ordering: .acquiring) == UInt(pthread_self()) }

    private func threadMain() {
        threadID.store(UInt(pthread_self()), ordering: .releasing)
        // libuv's writes (all pipe and terminal writes, and socket writes that
        // had to queue) happen on this thread. Blocking SIGPIPE here turns a
        // write to a closed pipe or socket into an EPIPE error instead of
        // killing the process, without changing the signal disposition of the
        // whole process. (Direct socket writes from other threads use
        // sendmsg with MSG_NOSIGNAL.)
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGPIPE)
        pthread_sigmask(SIG_BLOCK, &set, nil)

        uv_run(loop, UV_RUN_DEFAULT)

        // uv_run returns only once every handle is closed (see `shutdown`).
        uv_loop_close(loop)
        loop.deallocate()
        wakeup.deallocate()
        readBuffer.deallocate()
        let waiters = jobs.withLock { j -> [CheckedContinuation<Void, Never>] in
            j.stopped = true
            defer { j.exitWaiters = [] }
            return j.exitWaiters
        }
        for w in waiters { w.resume() }
    }

    /// Runs `job` on the loop thread, soon. Callable from any thread, including
    /// the loop thread (the job then runs on a later turn of the loop, never
    /// re-entrantly). Returns false if the loop has been shut down.
    @discardableResult
    func execute(_ job: @escaping @Sendable () -> Void) -> Bool {
        jobs.withLock { j -> Bool in
            if j.stopping { return false }
            j.queue.append(job)
            // Sent under the lock so it can never race with `shutdown` closing
            // the wakeup handle. uv_async_send coalesces: many sends before the
            // loop wakes cost one wakeup (and one eventfd write).
            uv_async_send(wakeup)
            return true
        }
    }

    /// Runs `body` on the loop thread and returns its result to the caller.
    func submit<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<T, Error>) in
            let ok = execute { c.resume(with: Result { try body() }) }
            if !ok { c.resume(throwing: EventLoopError.shutDown(name: name)) }
        }
    }

    fileprivate func runJobs() {
        assert(inLoopThread, "the wakeup handle fires on the loop thread")
        let batch = jobs.withLock { j -> [@Sendable () -> Void] in
            defer { j.queue = [] }
            return j.queue
        }
        for job in batch { job() }
    }

    /// Counts the handles of this loop that are open (not closing), excluding
    /// its own wakeup handle. A test helper to catch leaked handles.
    func openHandleCount() async throws -> Int {
        try await submit { [self] in
            final class Counter { var n = 0; var skip: UnsafeMutableRawPointer? }
            let counter = Counter()
            counter.skip = UnsafeMutableRawPointer(wakeup)
            // SAFETY: the counter outlives uv_walk, which calls back synchronously.
            withExtendedLifetime(counter) {
                uv_walk(loop, { handle, arg in
                    let c = Unmanaged<Counter>.fromOpaque(arg!).takeUnretainedValue()
                    if UnsafeMutableRawPointer(handle) != c.skip, uv_is_closing(handle) == 0 { c.n += 1 }
                }, Unmanaged.passUnretained(counter).toOpaque())
            }
            return counter.n
        }
    }

    /// Stops the loop once every handle on it has been closed, and waits for its
    /// thread to exit. Handles still open keep the loop running: close them first.
    /// Never call this on `EventLoop.shared`.
    func shutdown() async {
        let alreadyStopping = jobs.withLock { j -> Bool in
            defer { j.stopping = true }
            return j.stopping
        }
        if !alreadyStopping {
            // The closing job bypasses `execute` (which now refuses work).
            jobs.withLock { j in
                j.queue.append { [self] in
                    uv_close(UnsafeMutableRawPointer(self.wakeup).assumingMemoryBound(to: uv_handle_t.self), nil)
                }
                uv_async_send(wakeup)
            }
        }
        await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in
            let done = jobs.withLock { j -> Bool in
                if j.stopped { return true }
                j.exitWaiters.append(c)
                return false
            }
            if done { c.resume() }
        }
    }
}

private func eventLoopWakeup(_ handle: UnsafeMutablePointer<uv_async_t>?) {
    // SAFETY: data was set to the (unretained) EventLoop before the handle could
    // fire; the loop object is retained by its own thread while uv_run runs.
    guard let data = handle?.pointee.data else { return }
    Unmanaged<EventLoop>.fromOpaque(data).takeUnretainedValue().runJobs()
}

/// Work submitted to a loop that has been shut down.
enum EventLoopError: Error, CustomStringConvertible {
    case shutDown(name: String)
    var description: String {
        switch self {
        case .shutDown(let name): return "the libuv loop \(name) has been shut down; no more work can run on it"
        }
    }
}

/// A value confined to one loop's thread, which any thread may hold and pass
/// along (to jobs for `loop.execute`): only the loop thread may read or change
/// what it holds, and debug builds check that it does (swift-nio's
/// `NIOLoopBound`). The loop-confined state of the libuv transports lives in
/// these instead of classes marked Sendable one by one.
final class LoopBound<Value>: @unchecked Sendable {
    // `@unchecked Sendable` invariant: `stored` is touched only on `loop`'s thread (asserted).
    let loop: EventLoop
    private var stored: Value

    /// Wraps `value`, which nothing else may reach from now on but through this box.
    init(_ value: Value, on loop: EventLoop) {
        self.loop = loop
        stored = value
    }

    /// The value; on the loop thread only.
    var value: Value {
        _read {
            assert(loop.inLoopThread, "loop-bound state touched off the \(loop.name) loop thread")
            yield stored
        }
        _modify {
            assert(loop.inLoopThread, "loop-bound state touched off the \(loop.name) loop thread")
            yield &stored
        }
    }
}
