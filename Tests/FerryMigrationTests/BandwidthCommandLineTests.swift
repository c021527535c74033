// `--max-bandwidth` and `--max-bandwidth-file` on the real commands: a
// capped pull is byte-exact and takes at least bytes / cap; a cap written to
// the file while the pull runs takes effect; bad rates are refused before
// anything starts. (Rates within ±5 %: Tools/bench-bwcap.sh.)
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) final class BandwidthCommandLineTests {
    let cli: CLIHarness

    init() throws { cli = try CLIHarness() }

    /// The `bytes` and `seconds` of a leecher's `complete` event.
    func completion(_ line: String) throws -> (bytes: Double, seconds: Double) {
        func field(_ name: String) throws -> Double {
            guard let range = line.range(of: "\"\(name)\":"),
                  let value = Double(line[range.upperBound...].prefix { "0123456789.".contains($0) }) else {
                throw TestFailure("no \(name) in \(line)")
            }
            return value
        }
        return (try field("bytes"), try field("seconds"))
    }

    @Test func aPullCappedAtTheSeederIsByteExactAndTakesAtLeastBytesOverTheCap() throws {
        let child = try Memwriter(["--mib", "16", "--threads", "1", "--rate", "500", "--pattern"])
        defer { child.stop() }
        let cap = 8e6
        let (seeder, address) = try cli.startSeeder(pid: child.pid, ["--max-bandwidth", "8M"])
        defer { seeder.stop() }
        let out = scratchDirectory("bw-seeder")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let leecher = try cli.startLeecher(address, out: out)
        let done = try completion(try leecher.expect("{\"event\":\"complete\"", timeout: 120))
        #expect(leecher.waitForExit() == 0)
        #expect(seeder.waitForExit() == 0)
        #expect(done.bytes >= 16 * 1048576)
        // The first burst (256 KiB at this cap; 1 MiB allowed for) goes at once, the rest at the cap.
        #expect(done.seconds >= (done.bytes - 1048576) / cap, "\(done)")
        #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
    }

    @Test func aCapWrittenToTheFileWhileTheLeecherPullsTakesEffect() throws {
        let child = try Memwriter(["--mib", "32", "--threads", "1", "--rate", "500", "--pattern"])
        defer { child.stop() }
        let file = scratchDirectory("bw-file")
        FileManager.default.createFile(atPath: file, contents: Data("# the cap\n2M\n".utf8))
        defer { try? FileManager.default.removeItem(atPath: file) }
        let (seeder, address) = try cli.startSeeder(pid: child.pid)
        defer { seeder.stop() }
        let out = scratchDirectory("bw-leecher")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let began = Memwriter.now()
        let leecher = try cli.startLeecher(address, out: out, ["--max-bandwidth", "1G", "--max-bandwidth-file", file])
        // The file overrides the option while it exists.
        #expect(try leecher.expect("{\"event\":\"bandwidth\"").contains("\"bytes_per_s\":2000000"))
        // 32 MiB at 2 MB/s would take 17 s: lift the cap after a second.
        usleep(1_000_000)
        FileManager.default.createFile(atPath: file, contents: Data("none\n".utf8))
        let lifted = try leecher.expect("{\"event\":\"bandwidth\"", timeout: 10)
        #expect(lifted.contains("\"cap\":\"none\""), "\(lifted)")
        _ = try leecher.expect("{\"event\":\"complete\"", timeout: 60)
        #expect(leecher.waitForExit() == 0)
        #expect(Memwriter.now() - began < 12)
        #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
    }

    @Test func zeroNegativeAndGarbageRatesAreRefusedBeforeAnythingStarts() throws {
        for rate in ["0", "-5M", "fast", "10"] {
            let leecher = try ChildProcess(builtExecutable("leecher"),
                                           ["pull", "127.0.0.1:1", "--max-bandwidth", rate, "--json"])
            #expect(leecher.waitForExit() == 64, "--max-bandwidth \(rate)") // EX_USAGE, as ArgumentParser exits
        }
        let seeder = try ChildProcess(builtExecutable("seeder"), ["serve", "1", "--max-bandwidth", "1.2.3G"])
        #expect(seeder.waitForExit() == 64)
        let hub = try ChildProcess(builtExecutable("hub"), ["serve", "--upstream", "127.0.0.1:1", "--max-bandwidth", "0M"])
        #expect(hub.waitForExit() == 64)
    }
}
