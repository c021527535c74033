// The memwriter workload (Tools/memwriter) as the test suites use it.
import FerrySystem
import Glibc

/// A running memwriter child. Killed and reaped in `stop()` or deinit.
public final class Memwriter: @unchecked Sendable {
    // @unchecked: see ChildProcess; `regions` is written only in init.
    public let child: ChildProcess
    public var pid: Int32 { child.pid }
    /// `region <name> 0x<start> 0x<end>` lines, by name.
    public private(set) var regions: [String: AddressRange] = [:]

    public static var executable: String { builtExecutable("memwriter") }
    public static var patternKeyBase: UInt64 { 0x9E37_79B9_7F4A_7C15 }
    public static func patternKey(seed: UInt64) -> UInt64 { patternKeyBase &* (seed &+ 1) }

    /// Starts memwriter with `arguments` and reads its start-up block up to `pid N ready`.
    public init(_ arguments: [String]) throws {
        child = try ChildProcess(Self.executable, arguments)
        regions = try child.readStartupBlock("memwriter").regions
    }

    public func send(_ command: String) { child.send(command) }
    public func readLine(timeout: Double = 20) throws -> String { try child.readLine(timeout: timeout) }
    public func expect(_ prefix: String, timeout: Double = 20) throws -> String { try child.expect(prefix, timeout: timeout) }
    /// Sends SIGTERM and returns the exit status.
    public func terminate() -> Int32 { child.end(with: SIGTERM) }
    public func stop() { child.stop() }
    public static func now() -> Double { ChildProcess.now() }
}
