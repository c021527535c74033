// SIGINT, SIGTERM and SIGHUP end a migration cleanly: the seeder thaws a
// frozen process before it exits, so an interrupted migration loses nothing.
// Commands install the watcher before they attach to any process: a signal
// that arrives while a thread of the target runs a system call for us is
// held back until the call is over (FerrySystem's DeferredSignals) and then
// lands here, never in the default action that would end us mid-call.
import Foundation
import Synchronization
import FerryMigration

public final class SignalWatcher: Sendable {
    private let catcher: SignalCatcher?

    /// Catches `signals` from the moment it returns (FerrySystem's
    /// SignalCatcher: no window in which one is lost or ends the process).
    public init(_ signals: [Int32] = [SIGINT, SIGTERM, SIGHUP], handler: @escaping @Sendable (Int32) -> Void) {
        do {
            catcher = try SignalCatcher(signals, handler: handler)
        } catch {
            // sigaction or pipe2 failed: keep the default actions, and say so.
            FileHandle.standardError.write(Data("warning: cannot catch signals \(signals): \(error); they take their default action\n".utf8))
            catcher = nil
        }
    }

    public func cancel() {
        catcher?.cancel()
    }
}

/// Holds a signal that arrives before there is anything to tell (while
/// attaching), and passes it, and every later one, to the handler once
/// `connect` gives one.
public final class SignalRelay: Sendable {
    private struct State {
        var first: Int32? = nil
        var handler: (@Sendable (Int32) -> Void)? = nil
    }
    private let state = Mutex(State())

    public init() {}

    /// The first signal received while no handler was connected.
    public var pending: Int32? { state.withLock { $0.first } }

    /// Give this to a `SignalWatcher`.
    public func receive(_ signal: Int32) {
        let handler = state.withLock { s -> (@Sendable (Int32) -> Void)? in
            if s.handler == nil && s.first == nil { s.first = signal }
            return s.handler
        }
        handler?(signal)
    }

    /// From now on, signals go to `handler`; one received before goes at once.
    public func connect(_ handler: @escaping @Sendable (Int32) -> Void) {
        let early = state.withLock { s -> Int32? in
            s.handler = handler
            return s.first
        }
        if let early { handler(early) }
    }
}
