// SIGINT and SIGTERM end a migration cleanly: the seeder thaws a frozen
// process before it exits, so an interrupted migration loses nothing.
import Dispatch
import Foundation

public final class SignalWatcher: @unchecked Sendable {
    // @unchecked: `sources` is written once in init and then only cancelled,
    // which DispatchSource allows from any thread.
    private let sources: [any DispatchSourceSignal]

    public init(_ signals: [Int32] = [SIGINT, SIGTERM], handler: @escaping @Sendable (Int32) -> Void) {
        sources = signals.map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { handler(number) }
            source.resume()
            return source
        }
    }

    public func cancel() {
        for source in sources { source.cancel() }
    }
}
