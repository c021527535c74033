// The deadleader workload (Tools/deadleader) as the test suites use it: a
// process whose main thread has exited while two threads write (issue 15,
// class 4).
import FerrySystem
import Glibc

/// A running deadleader child. Killed and reaped in `stop()` or deinit.
public final class DeadLeader: @unchecked Sendable {
    // @unchecked: see ChildProcess; `regions` is written only in init.
    public let child: ChildProcess
    /// The thread-group id: the pid of the exited (zombie) main thread.
    public var pid: Int32 { child.pid }
    /// `region <name> 0x<start> 0x<end>` lines, by name (writer1, writer2).
    public private(set) var regions: [String: AddressRange] = [:]

    public static var executable: String { builtExecutable("deadleader") }

    /// Starts deadleader and waits until its main thread is a zombie and both
    /// writers run; with `leaderWaits`, until both writers run, the main
    /// thread waiting for `exitLeader()`.
    public init(mib: Int = 8, rate: Int = 20000, leaderWaits: Bool = false) throws {
        child = try ChildProcess(Self.executable, ["--mib", "\(mib)", "--rate", "\(rate)"] + (leaderWaits ? ["--leader-waits"] : []))
        regions = try child.readStartupBlock("deadleader").regions
    }

    /// The thread ids of the process other than the exited leader.
    public var liveThreads: [Int32] {
        var tids: [Int32] = []
        guard let dir = opendir("/proc/\(pid)/task") else { return [] }
        defer { closedir(dir) }
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let tid = Int32(name), tid != pid { tids.append(tid) }
        }
        return tids.sorted()
    }

    /// The state letter of the leader (`Z` once its main thread has exited).
    public var leaderState: Character? { child.state }

    /// With `leaderWaits`: makes the main thread call pthread_exit and waits until it is a zombie.
    public func exitLeader() throws {
        child.send("exit")
        try exitLeaderAndWait()
    }

    /// Sends nothing (`send("exit")` was sent): waits until the main thread is a zombie.
    public func exitLeaderAndWait() throws {
        _ = try child.expect("leader exiting")
        let deadline = ChildProcess.now() + 10
        while leaderState != "Z" {
            guard ChildProcess.now() < deadline else { throw TestFailure("the main thread of pid \(pid) did not exit") }
            usleep(1000)
        }
    }

    public func send(_ command: String) { child.send(command) }
    public func stop() { child.stop() }
}
