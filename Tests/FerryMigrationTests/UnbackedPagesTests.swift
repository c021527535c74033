// Pages past the end of a shared memory object are mapped but backed by
// nothing: the process gets SIGBUS there. They must migrate as holes (zeros
// in the image, listed as holes), never as pages someone waits for (issue 15,
// class 3: the leecher waited forever with the source frozen).
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct UnbackedPagesTests {
    /// A 5-page memfd mapped 8 pages long, shared and private, under the
    /// given tracker; the last 3 pages of each mapping are past its end.
    @Test(arguments: [TrackerKind.async, TrackerKind.sync])
    func pagesPastTheEndOfAFileMigrateAsHoles(tracker: TrackerKind) async throws {
        let script = """
            import ctypes, os, time
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
            fd = os.memfd_create("short")
            os.ftruncate(fd, 5 * 4096)
            for flags, name in ((1, "shared"), (2, "private")):
                address = libc.mmap(None, 8 * 4096, 3, flags, fd, 0)
                ctypes.memset(address, 0x42, 5 * 4096)
                print(name, address, flush=True)
            time.sleep(120)
            """
        let child = try ChildProcess("/usr/bin/python3", ["-c", script])
        defer { child.stop() }
        var mappings: [UInt64] = []
        for _ in 0..<2 {
            let words = try child.readLine().split(separator: " ")
            mappings.append(try #require(UInt64(words[1])))
        }
        let process = try TrackedProcess.attach(pid: child.pid, tracker: tracker)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory("holes-\(tracker.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        let summary = try await leecher.run()
        for start in mappings {
            let region = try #require(summary.manifest.regions.first { $0.start == start })
            #expect(region.holes == [[start + 5 * pageSize, start + 8 * pageSize]], "\(region)")
        }
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
    }
}
