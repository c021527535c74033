// The memwriter workload (Tools/memwriter): its command line and protocol.
// The class tests drive it with lives in FerryTestSupport.
import Testing
import FerryTestSupport
import Glibc
@testable import FerrySystem


/// Runs memwriter to completion with `arguments`, returning (status, stdout, stderr).
func runMemwriter(_ arguments: [String]) throws -> (Int32, String, String) {
    try runTool(Memwriter.executable, arguments)
}

/// Runs `path` to completion with `arguments`, returning (exit status, stdout, stderr).
func runTool(_ path: String, _ arguments: [String]) throws -> (Int32, String, String) {
    let out = "/tmp/ferry-tool-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let command = ([path] + arguments).map { "'\($0)'" }.joined(separator: " ")
    let status = system("\(command) >\(out).1 2>\(out).2 </dev/null")
    defer { unlink(out + ".1"); unlink(out + ".2") }
    func slurp(_ path: String) -> String {
        guard let f = fopen(path, "r") else { return "" }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var c = fgetc(f)
        while c != EOF { bytes.append(UInt8(c)); c = fgetc(f) }
        return String(decoding: bytes, as: UTF8.self)
    }
    return ((status >> 8) & 0xff, slurp(out + ".1"), slurp(out + ".2"))
}

@Suite struct MemwriterTests {
    @Test func helpDescribesOptionsAndProtocol() throws {
        let (status, out, _) = try runMemwriter(["--help"])
        #expect(status == 0)
        for word in ["--mib", "--threads", "--rate", "--churn", "--heap-grow", "--zap", "--shared", "--memfd",
                     "--seed", "--pattern", "--stop-after", "--wait", "ready"] {
            #expect(out.contains(word), "help lacks \(word)")
        }
    }

    @Test func badOptionsFailWithAMessage() throws {
        let (status, _, err) = try runMemwriter(["--bogus"])
        #expect(status == 2)
        #expect(err.contains("unknown option '--bogus'"))
        let (status2, _, err2) = try runMemwriter(["--mib", "lots"])
        #expect(status2 == 2)
        #expect(err2.contains("--mib: 'lots' is not a non-negative number"))
    }

    @Test func announcesRegionsAndWritesCheckableValues() throws {
        let seed: UInt64 = 7
        let writer = try Memwriter(["--mib", "2", "--shared", "1", "--threads", "2", "--stop-after", "300",
                                    "--pattern", "--seed", "\(seed)", "--wait"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        let shared = try #require(writer.regions["shared"])
        #expect(main.length == 2 << 20)
        #expect(shared.length == 1 << 20)
        writer.send("go")
        #expect(try writer.expect("done") == "done 600")

        let reader = try PageReader(pid: writer.pid)
        let ranges = [main, shared]
        let total = Int(main.length + shared.length)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 4096)
        defer { buffer.deallocate() }
        #expect(try reader.read(ranges, into: buffer) == total)

        let key = Memwriter.patternKey(seed: seed)
        var written = 0
        for page in 0..<(total / 4096) {
            // Offsets restart at 0 in each region for the pattern.
            let regionOffset = page < Int(main.pageCount) ? page * 4096 : (page - Int(main.pageCount)) * 4096
            let word1 = buffer.load(fromByteOffset: page * 4096 + 8, as: UInt64.self)
            var firstWord = 2
            if word1 == UInt64(page) | 1 << 63 {
                written += 1
                let word0 = buffer.load(fromByteOffset: page * 4096, as: UInt64.self)
                #expect(word0 >> 48 < 2, "thread id of page \(page)")
                #expect(word0 & 0xffff_ffff_ffff >= 1 && word0 & 0xffff_ffff_ffff <= 300)
            } else {
                firstWord = 0
            }
            for word in firstWord..<512 {
                let value = buffer.load(fromByteOffset: page * 4096 + word * 8, as: UInt64.self)
                if value != UInt64(regionOffset + word * 8) ^ key {
                    Issue.record("page \(page) word \(word) = \(value), not the pattern")
                    return
                }
            }
        }
        #expect(written > 0 && written <= 600)
    }

    @Test func sweepAndCountAnswer() throws {
        let writer = try Memwriter(["--mib", "1", "--no-write"])
        defer { writer.stop() }
        writer.send("sweep")
        let sweep = try writer.expect("sweep").split(separator: " ")
        #expect(sweep.count == 3 && sweep[1] == "256")
        #expect((UInt64(sweep[2]) ?? 0) > 0)
        writer.send("count")
        #expect(try writer.expect("count") == "count 0")
    }

    @Test func exitsCleanlyOnSIGTERM() throws {
        let writer = try Memwriter(["--mib", "1", "--threads", "2", "--churn", "--heap-grow", "--zap", "--rate", "1000"])
        usleep(50_000)
        let status = try #require(writer.terminate(), "memwriter ignored SIGTERM")
        #expect(status & 0x7f == 0, "killed by a signal")
        #expect((status >> 8) & 0xff == 0)
    }
}
