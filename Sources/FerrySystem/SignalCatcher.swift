// Catching SIGINT, SIGTERM and the like without a window in which they are
// lost or take their default action.
//
// Why not a DispatchSource: on Linux, libdispatch installs its signal handler
// when its manager thread gets to the registration, some time after
// `resume()`; until then the disposition is whatever it was (SIG_IGN, which
// drops the signal, or the default, which ends us). A Ctrl-C right after
// start-up, while we attach, fell into that gap. Here the handler is in place
// when `init` returns: it writes the signal's number to a pipe, and a thread
// of ours reads it and calls the handler. DeferredSignals saves and restores
// this handler like any other.
// Kernel: any. Capability: none.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit

/// Calls `handler` for each of `signals` the process receives, on a thread
/// that all catchers share. Several may be alive; each sees its own signals.
///
/// `@unchecked Sendable` invariant: the shared registry is read and written
/// only while holding `registryLock`; instances are immutable.
public final class SignalCatcher: @unchecked Sendable {
    private static let registryLock = Lock()
    // SAFETY: read and written only while holding `registryLock`.
    nonisolated(unsafe) private static var registry: [ObjectIdentifier: (signals: Set<Int32>, handler: @Sendable (Int32) -> Void)] = [:]
    nonisolated(unsafe) private static var readerStarted = false

    public init(_ signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) throws {
        try Self.registryLock.withLock {
            Self.registry[ObjectIdentifier(self)] = (Set(signals), handler)
            let fd = signals.withUnsafeBufferPointer { ferry_signals_catch($0.baseAddress, Int32($0.count)) }
            guard fd >= 0 else {
                Self.registry[ObjectIdentifier(self)] = nil
                throw SystemError(operation: "sigaction", target: "signals \(signals) of this process", errno: errno)
            }
            if !Self.readerStarted {
                // Lives as long as the process (the pipe is never closed).
                let thread = try startThread(for: "the signal catcher") { Self.read(fd) }
                pthread_detach(thread)
                Self.readerStarted = true
            }
        }
    }

    private static func read(_ fd: Int32) {
        while true {
            var byte: UInt8 = 0
            let n = Glibc.read(fd, &byte, 1)
            if n == 1 {
                let signal = Int32(byte)
                let handlers = registryLock.withLock { registry.values.filter { $0.signals.contains(signal) }.map(\.handler) }
                for handler in handlers { handler(signal) }
            } else if n < 0 && errno == EINTR {
                continue
            } else {
                return
            }
        }
    }

    /// Lets `signal` take its default action now, on the calling thread, as
    /// if it had not been caught: for SIGTSTP, the process stops (unless its
    /// process group is orphaned, where the kernel drops it) and this call
    /// returns once it is continued. Catching resumes afterwards.
    public static func takeDefaultAction(_ signal: Int32) {
        _ = ferry_signal_default_action(signal)
    }

    /// Stops calling the handler. The signals stay caught (and are dropped),
    /// so one that arrives while the process winds down does not end it
    /// half-way.
    public func cancel() {
        Self.registryLock.withLock { Self.registry[ObjectIdentifier(self)] = nil }
    }

    deinit { cancel() }
}
