// The relay in Tools/relay: forwards TCP to a target and cuts every
// connection on command, so tests can drop a migration's link mid-flight.
import Glibc

public final class Relay: Sendable {
    public let child: ChildProcess
    public let port: UInt16

    public init(to target: String) throws {
        child = try ChildProcess(builtExecutable("relay"), ["--listen", "0", "--to", target])
        let line = try child.expect("relay listening")
        guard let port = UInt16(line.split(separator: " ").last ?? "") else {
            throw TestFailure("relay said \(line)")
        }
        self.port = port
    }

    /// Cuts every relayed connection and waits until the relay has done it.
    public func drop() {
        child.send("drop")
        _ = try? child.expect("dropped", timeout: 5)
    }

    /// Refuses the next `count` connections.
    public func refuse(_ count: Int) {
        child.send("refuse \(count)")
        _ = try? child.expect("refusing", timeout: 5)
    }

    public func stop() { child.stop() }
}
