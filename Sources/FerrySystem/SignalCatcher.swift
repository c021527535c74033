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
import Synchronization

/// Calls `handler` for each of `signals` the process receives, on a thread
/// that all catchers share. Several may be alive; each sees its own signals.
public final class SignalCatcher: Sendable {
    private struct Registry {
        var catchers: [ObjectIdentifier: (signals: Set<Int32>, handler: @Sendable (Int32) -> Void)] = [:]
        var readerStarted = false
    }
    private static let registry = Mutex(Registry())

    public init(_ signals: [Int32], handler: @escaping @Sendable (Int32) -> Void) throws {
        let id = ObjectIdentifier(self)
        try Self.registry.withLock { registry in
            registry.catchers[id] = (Set(signals), handler)
            let fd = signals.withUnsafeBufferPointer { ferry_signals_catch($0.baseAddress, Int32($0.count)) }
            guard fd >= 0 else {
                registry.catchers[id] = nil
                throw SystemError(operation: "sigaction", target: "signals \(signals) of this process", errno: errno)
            }
            if !registry.readerStarted {
                // Lives as long as the process (the pipe is never closed).
                let thread = try startThread(for: "the signal catcher") { Self.read(fd) }
                pthread_detach(thread)
                registry.readerStarted = true
            }
        }
    }

    private static func read(_ fd: Int32) {
        while true {
            var byte: UInt8 = 0
            guard case .done(1)? = try? systemCall("read", on: "the signal pipe", { Glibc.read(fd, &byte, 1) }) else { return }
            let signal = Int32(byte)
            let handlers = registry.withLock { $0.catchers.values.filter { $0.signals.contains(signal) }.map(\.handler) }
            for handler in handlers { handler(signal) }
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
        let id = ObjectIdentifier(self)
        Self.registry.withLock { $0.catchers[id] = nil }
    }

    deinit { cancel() }
}
