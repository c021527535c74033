// redis-server moves whole (issue 13): written by redis-benchmark while
// Ferry pre-copies, restored by CRIU on the destination host, where every key
// written before the freeze reads back and DBSIZE matches.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

enum Redis {
    static let server = "/usr/bin/redis-server"
    static let cli = "/usr/bin/redis-cli"
    static let benchmark = "/usr/bin/redis-benchmark"
    static var available: Bool { [server, cli, benchmark].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) } }
}

@Suite(.serialized, .enabled(if: CriuSupport.available, Comment(rawValue: CriuSupport.reason)),
       .enabled(if: Redis.available, "needs redis-server, redis-cli and redis-benchmark (apt-get install redis-server redis-tools)"))
struct CriuRedisTests {
    static let port = "6391"

    /// Runs redis-cli in namespace `ns`; its output, trimmed.
    func cli(_ hosts: CriuHosts, _ ns: String, _ arguments: [String]) throws -> String {
        let child = try hosts.inNamespace(ns, [Redis.cli, "-p", Self.port] + arguments)
        var lines: [String] = []
        while let line = try? child.readLine(timeout: 10) { lines.append(line) }
        _ = child.waitForExit(timeout: 10)
        return lines.joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func redisKeysReadBackAfterRestore() throws {
        let hosts = try CriuHosts()
        // Its own session, streams on /dev/null, no inherited descriptors, no
        // snapshots: nothing CRIU would have to find again.
        let (parent, source) = try hosts.startInPidNamespace(
            ["/usr/bin/setsid", "/bin/bash", "-c",
             "for fd in /proc/$$/fd/*; do n=${fd##*/}; [ \"$n\" -gt 2 ] 2>/dev/null && eval \"exec $n>&-\"; done; exec \(Redis.server) --port \(Self.port) --bind 127.0.0.1 --save '' --appendonly no --enable-debug-command yes </dev/null >/dev/null 2>&1"])
        defer { parent.stop() }
        let deadline = ChildProcess.now() + 20
        while try cli(hosts, hosts.source, ["PING"]) != "PONG" {
            guard ChildProcess.now() < deadline else { throw TestFailure("redis-server did not answer") }
            usleep(100_000)
        }
        // About 150 MB: Ferry's first pre-copy pass outlasts the writes below, so
        // the freeze comes after them, and after their connections closed (CRIU
        // would refuse a connected TCP socket).
        #expect(try cli(hosts, hosts.source, ["DEBUG", "POPULATE", "1000000", "known", "64"]) == "OK")
        let seeder = try hosts.seeder(pid: source)
        defer { seeder.stop() }
        let benchmark = try hosts.inNamespace(hosts.source, [Redis.benchmark, "-p", Self.port, "-t", "set", "-n", "200000",
                                                             "-P", "16", "-r", "1000000", "-d", "64", "-q"])
        defer { benchmark.stop() }
        // Capped, the first pass takes about 5 s: the writes end well before it.
        let leecher = try hosts.leecher(["--finalize-at", "100%", "--max-bandwidth", "30M"])
        defer { leecher.stop() }
        #expect(benchmark.waitForExit(timeout: 60) == 0)
        let before = try cli(hosts, hosts.source, ["DBSIZE"])
        print("criu redis test: writes done, DBSIZE \(before)")
        #expect(!(try leecher.expect("{\"event\":\"connected\"", timeout: 30)).isEmpty)
        var restoredLine = ""
        while restoredLine.isEmpty {
            let line = try leecher.readLine(timeout: 90)
            if line.hasPrefix("{\"event\":\"restored\"") { restoredLine = line }
            if line.hasPrefix("{\"event\":\"finalizing\"") || line.hasPrefix("{\"event\":\"error\"") { print("criu redis test: \(line)") }
        }
        guard let restored = CriuHosts.field("pid", in: restoredLine).map({ Int32($0) }) else {
            throw TestFailure("no pid in \(restoredLine)")
        }
        defer { kill(restored, SIGKILL) }
        _ = try leecher.expect("{\"event\":\"last_page\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit(timeout: 30) == 0)
        let after = try cli(hosts, hosts.destination, ["DBSIZE"])
        print("criu redis test: DBSIZE \(before) before the freeze, \(after) after the restore")
        #expect(Int(before) ?? 0 > 1_000_000)
        #expect(after == before)
        for key in [0, 12_345, 999_999] {
            // DEBUG POPULATE pads "value:N" to the size asked for.
            let value = "value:\(key)"
            #expect(try cli(hosts, hosts.destination, ["GETRANGE", "known:\(key)", "0", "\(value.utf8.count - 1)"]) == value)
        }
        // The source is gone.
        #expect(parent.waitForExit(timeout: 10) != nil)
    }
}
