// Compression end to end (issue 14): real `seeder` and `leecher` processes
// migrate a CPython heap of strings through the relay, which counts the
// bytes on the wire; the image must match the frozen source byte for byte.
// (Runs with the other command-line suites: Tools/test.sh's filter matches
// "CommandLineTests".)
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) final class CompressionCommandLineTests {
    let harness: CLIHarness
    init() throws { harness = try CLIHarness() }

    static let python = "/usr/bin/python3"

    /// A CPython process holding about `mib` MiB of record-like strings.
    func startPython(mib: Int) throws -> ChildProcess {
        let script = """
            import random, sys, os
            random.seed(7)
            d = {}
            size = 0
            i = 0
            while size < \(mib) << 20:
                v = '{"id": %d, "name": "user%d", "city": "%s", "balance": %d}' % (i, i, random.choice(["Oslo", "Lima", "Perth"]), random.randrange(10**6))
                d["key:%d" % i] = v
                size += len(v) + 60
                i += 1
            print("ready", flush=True)
            sys.stdin.readline()
            """
        let child = try ChildProcess(Self.python, ["-c", script])
        _ = try child.expect("ready", timeout: 120)
        return child
    }

    /// Migrates `pid` through a relay with the given --compress flags; returns
    /// the page bytes the leecher received and the bytes the relay carried to it.
    func migrate(pid: Int32, seederCompress: String, leecherCompress: String, name: String) throws -> (pageBytes: Int, wire: Int) {
        let (seeder, address) = try harness.startSeeder(pid: pid, ["--compress", seederCompress])
        defer { seeder.stop() }
        let relay = try Relay(to: address)
        defer { relay.stop() }
        let out = scratchDirectory(name)
        defer { try? FileManager.default.removeItem(atPath: out) }
        let leecher = try harness.startLeecher("127.0.0.1:\(relay.port)", out: out, ["--compress", leecherCompress])
        defer { leecher.stop() }
        let complete = try leecher.expect("{\"event\":\"complete\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit() == 0)
        // Byte-exact: the image against the frozen source.
        let verify = try ChildProcess(builtExecutable("leecher"), ["verify", out, "--pid", "\(pid)", "--json"])
        #expect(try verify.expect("{\"event\":\"verified\"").contains("\"pid\":\(pid)"))
        #expect(verify.waitForExit() == 0)
        let bytes = complete.range(of: #""bytes":\d+"#, options: .regularExpression).map { Int(complete[$0].dropFirst(8))! } ?? 0
        let wire = try #require(relay.bytes())
        return (bytes, wire.toClient)
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: python), "python3 is not installed"))
    func aMigrationWithZstdIsByteExactAndSmallerOnTheWire() throws {
        let child = try startPython(mib: 24)
        defer { child.stop() }
        let r = try migrate(pid: child.pid, seederCompress: "zstd", leecherCompress: "zstd", name: "zstd")
        #expect(r.pageBytes > 20 << 20)
        #expect(r.wire < r.pageBytes / 2, "\(r.wire) bytes on the wire for \(r.pageBytes) bytes of pages")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: python), "python3 is not installed"))
    func throughAHubWithZstdOnEveryHop() throws {
        // seeder --(zstd)--> hub --(zstd, through the relay)--> leecher, byte-exact.
        let child = try startPython(mib: 16)
        defer { child.stop() }
        let (seeder, seederAddress) = try harness.startSeeder(pid: child.pid, ["--compress", "zstd"])
        defer { seeder.stop() }
        let hub = try ChildProcess(builtExecutable("hub"),
                                   ["serve", "--listen", "127.0.0.1:0", "--upstream", seederAddress,
                                    "--secret-file", harness.secretPath, "--compress", "zstd", "--json"])
        defer { hub.stop() }
        let line = try hub.expect("{\"event\":\"listening\"")
        let hubAddress = String(line[try #require(line.range(of: #"127\.0\.0\.1:\d+"#, options: .regularExpression))])
        let relay = try Relay(to: hubAddress)
        defer { relay.stop() }
        let out = scratchDirectory("hub-zstd")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let leecher = try harness.startLeecher("127.0.0.1:\(relay.port)", out: out, ["--compress", "zstd"])
        defer { leecher.stop() }
        let complete = try leecher.expect("{\"event\":\"complete\"", timeout: 120)
        #expect(leecher.waitForExit() == 0)
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
        let bytes = complete.range(of: #""bytes":\d+"#, options: .regularExpression).map { Int(complete[$0].dropFirst(8))! } ?? 0
        let wire = try #require(relay.bytes())
        #expect(bytes > 12 << 20 && wire.toClient < bytes / 2, "\(wire.toClient) bytes on the wire for \(bytes) bytes of pages")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: python), "python3 is not installed"))
    func aSeederThatSaysOffGetsUncompressedRecords() throws {
        let child = try startPython(mib: 8)
        defer { child.stop() }
        let r = try migrate(pid: child.pid, seederCompress: "off", leecherCompress: "zstd", name: "off")
        #expect(r.wire >= r.pageBytes, "\(r.wire) bytes on the wire for \(r.pageBytes) bytes of pages")
    }
}
