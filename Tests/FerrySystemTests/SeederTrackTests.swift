// `seeder track` end to end: the executable from the build directory against
// a real memwriter child. Needs the seeder product built (swift build
// --build-tests builds every product).
import Testing
import FerryTestSupport
import Glibc
@testable import FerrySystem

@Suite struct SeederTrackTests {
    let seeder = builtExecutable("seeder")

    @Test func jsonEventsThenDetachLeavesTheProcessRunning() throws {
        #expect(access(seeder, X_OK) == 0, "\(seeder) is missing: build the seeder product")
        let writer = try Memwriter(["--mib", "4", "--threads", "1", "--rate", "2000"])
        defer { writer.stop() }
        let main = try #require(writer.regions["main"])
        let (status, out, err) = try runTool(seeder, ["track", "\(writer.pid)", "--seconds", "1.3", "--interval", "100", "--json"])
        #expect(status == 0, "stderr: \(err)")
        let lines = out.split(separator: "\n").map(String.init)
        #expect(lines.first == "{\"event\":\"attached\",\"pid\":\(writer.pid),\"tracker\":\"async\"}")
        // The mapping may have merged with a neighbour: find the region that contains it.
        #expect(lines.contains { line in
            guard line.hasPrefix("{\"event\":\"region\","), let start = jsonInteger(line, "start"), let end = jsonInteger(line, "end") else { return false }
            return start <= main.start && main.end <= end && line.contains("\"kind\":\"migrate\"")
        })
        #expect(lines.contains { $0.contains("\"name\":\"[vdso]\"") && $0.contains("\"kind\":\"skip\"") })
        #expect(lines.contains { $0.hasPrefix("{\"event\":\"tracking\",") })
        let intervals = lines.filter { $0.hasPrefix("{\"event\":\"interval\",") }
        #expect(intervals.count >= 1)
        // About 2000 writes per second over a thousand pages: hundreds of dirty pages each second.
        let dirtyCounts = intervals.compactMap { jsonInteger($0, "dirtyPages") }
        #expect(dirtyCounts.contains { $0 > 100 }, "\(intervals)")
        #expect(lines.last?.hasPrefix("{\"event\":\"detached\",\"pid\":\(writer.pid),") == true)
        // The process runs on, untraced.
        writer.send("count")
        let first = try writer.expect("count")
        usleep(50_000)
        writer.send("count")
        #expect(try writer.expect("count") != first)
        #expect(try String(contentsOfProc: "/proc/\(writer.pid)/status").contains("TracerPid:\t0"))
    }

    /// `--rearm read` counts each written page once (nothing is read, so
    /// nothing is re-armed); `--rearm scan` counts the pages rewritten in
    /// every interval again.
    @Test func rearmOnReadCountsEachPageOnceRearmOnScanEveryInterval() throws {
        let writer = try Memwriter(["--mib", "1", "--threads", "1", "--rate", "20000"])
        defer { writer.stop() }
        func total(_ mode: String) throws -> Int {
            let (status, out, err) = try runTool(seeder, ["track", "\(writer.pid)", "--seconds", "1.5", "--interval", "100",
                                                          "--rearm", mode, "--json"])
            #expect(status == 0, "stderr: \(err)")
            let detached = out.split(separator: "\n").map(String.init).last { $0.hasPrefix("{\"event\":\"detached\",") }
            return try #require(detached.flatMap { jsonInteger($0, "dirtyPages") }.map(Int.init), "\(out)")
        }
        let byScan = try total("scan")
        let byRead = try total("read")
        // 20,000 writes a second over 256 pages: nearly every page again in each of ~15 intervals.
        #expect(byScan > 2000, "\(byScan)")
        #expect(byRead * 4 < byScan, "read \(byRead), scan \(byScan)")
        let (status, _, err) = try runTool(seeder, ["track", "\(writer.pid)", "--rearm", "never"])
        #expect(status != 0)
        #expect(err.contains("rearm"), "\(err)")
    }

    @Test func textShowsRegionsTrackerAndRates() throws {
        let writer = try Memwriter(["--mib", "2", "--shared", "1", "--rate", "500"])
        defer { writer.stop() }
        let (status, out, err) = try runTool(seeder, ["track", "\(writer.pid)", "--seconds", "1.1", "--interval", "200"])
        #expect(status == 0, "stderr: \(err)")
        #expect(out.hasPrefix("pid \(writer.pid): tracker async"))
        #expect(out.contains("/dev/zero (deleted)"))
        #expect(out.contains("dirty pages/s"))
        #expect(out.contains("detached from pid \(writer.pid) after"))
    }

    @Test func processExitingDuringTrackingFails() throws {
        let writer = try Memwriter(["--mib", "2", "--rate", "1000"])
        defer { writer.stop() }
        let script = "(sleep 0.6; kill -9 \(writer.pid)) & exec '\(seeder)' track \(writer.pid) --seconds 5 --interval 100"
        let (status, _, err) = try runTool("/bin/sh", ["-c", script])
        #expect(status == 1)
        #expect(err.hasPrefix("seeder: "), "\(err)")
        #expect(err.contains("pid \(writer.pid)") && err.contains("exited"), "\(err)")
    }

    @Test func errorsArePrefixedAndFail() throws {
        let (status, out, err) = try runTool(seeder, ["track", "2147483647", "--seconds", "1"])
        #expect(status == 1)
        #expect(out.isEmpty)
        #expect(err == "seeder: cannot attach to pid 2147483647: no such process (check the pid; the process may have exited)\n")

        let writer = try Memwriter(["--mib", "1", "--no-write"])
        defer { writer.stop() }
        let (status2, _, err2) = try runTool(seeder, ["track", "\(writer.pid)", "--tracker", "soft-dirty", "--seconds", "1"])
        if err2.contains("CONFIG_MEM_SOFT_DIRTY") {
            #expect(status2 == 1)
            #expect(err2.hasPrefix("seeder: cannot use the soft-dirty tracker on pid \(writer.pid)"))
        } else {
            #expect(status2 == 0, "soft-dirty is available here, so tracking should succeed: \(err2)")
        }
        let (status3, _, err3) = try runTool(seeder, ["track", "\(writer.pid)", "--tracker", "fast"])
        #expect(status3 != 0)
        #expect(err3.contains("fast"))
    }
}

/// The integer value of `"key":` in a one-line JSON object (no Foundation in these tests).
func jsonInteger(_ line: String, _ key: String) -> UInt64? {
    guard let r = line.firstRange(of: "\"\(key)\":") else { return nil }
    return UInt64(String(line[r.upperBound...].prefix { $0.isNumber }))
}

extension String {
    /// Reads a small /proc file (their size is unknown until read).
    init(contentsOfProc path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw TestFailure("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        self = String(decoding: bytes, as: UTF8.self)
    }
}
