// The relay in Tools/relay: forwards TCP to a target and cuts every
// connection on command, so tests can drop a migration's link mid-flight;
// it can also delay every byte, and hold one direction (stop reading it)
// to play a peer that keeps its connection but stops reading.
import Glibc

public final class Relay: Sendable {
    public let child: ChildProcess
    public let port: UInt16

    /// With `delayMilliseconds`, every byte waits that long in each direction;
    /// `rate` caps each direction at that many bytes per second (Tools/relay's `--rate`).
    public init(to target: String, delayMilliseconds: Int = 0, rate: Int? = nil) throws {
        child = try ChildProcess(builtExecutable("relay"),
                                 ["--listen", "0", "--to", target]
                                     + (delayMilliseconds > 0 ? ["--delay-ms", "\(delayMilliseconds)"] : [])
                                     + (rate.map { ["--rate", "\($0)"] } ?? []))
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

    /// Which way bytes stop: `down` is what the target sends to the client
    /// (the client stops reading), `up` what the client sends.
    public enum Direction: String, Sendable { case up, down }

    /// Stops reading `direction` in every connection, until `release()`.
    public func hold(_ direction: Direction) {
        child.send("hold \(direction.rawValue)")
        _ = try? child.expect("holding", timeout: 5)
    }

    /// Forwards both directions again.
    public func release() {
        child.send("release")
        _ = try? child.expect("released", timeout: 5)
    }

    /// Bytes relayed so far: client to target, target to client.
    public func bytes() -> (toTarget: Int, toClient: Int)? {
        child.send("bytes")
        guard let line = try? child.expect("bytes ", timeout: 5) else { return nil }
        let f = line.split(separator: " ").compactMap { Int($0) }
        return f.count == 2 ? (f[0], f[1]) : nil
    }

    /// Connections accepted so far (and still relayed): a client that has
    /// connected is at least in its handshake.
    public func accepted() -> Int {
        child.send("count")
        let line = (try? child.expect("connections", timeout: 5)) ?? ""
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    public func stop() { child.stop() }
}
