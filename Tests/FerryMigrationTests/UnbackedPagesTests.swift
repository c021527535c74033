// Pages past the end of a shared memory object are mapped but backed by
// nothing: the process gets SIGBUS there. They must migrate as holes (zeros
// in the image, listed as holes), never as pages someone waits for (issue 15,
// class 3: the leecher waited forever with the source frozen).
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct UnbackedPagesTests {
    /// A Python child holding a 5-page memfd mapped 8 pages long, shared and
    /// private, its 5 backed pages filled with 0x42; returns it and the two
    /// mappings' addresses.
    static func shortMemfdChild() throws -> (ChildProcess, [UInt64]) {
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
        var mappings: [UInt64] = []
        for _ in 0..<2 {
            let line = try child.readLine()
            guard let address = line.split(separator: " ").last.flatMap({ UInt64($0) }) else {
                child.stop()
                throw TestFailure("the child printed \(line), not a mapping's address")
            }
            mappings.append(address)
        }
        return (child, mappings)
    }

    /// A 5-page memfd mapped 8 pages long, shared and private, under the
    /// given tracker; the last 3 pages of each mapping are past its end.
    /// Directly from the seeder under each tracker, and through a hub (which
    /// relayed holes as zero pages before it kept a hole mark per page).
    @Test(arguments: [(TrackerKind.async, false), (.sync, false), (.async, true)])
    func pagesPastTheEndOfAFileMigrateAsHoles(tracker: TrackerKind, throughHub: Bool) async throws {
        let (child, mappings) = try Self.shortMemfdChild()
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid, tracker: tracker)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        var connect = seeder.connector()
        var hub: LoopbackHub? = nil
        if throughHub {
            hub = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
            try await hub!.hub.addUpstream(connect: seeder.connector())
            connect = hub!.connector()
        }
        defer { hub?.close() }
        let out = scratchDirectory("holes-\(tracker.rawValue)\(throughHub ? "-hub" : "")")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
        let leecher = Leecher(connect: connect, sink: try ImageWriter(directory: out), options: options)
        let summary = try await leecher.run()
        for start in mappings {
            let region = try #require(summary.manifest.regions.first { $0.start == start })
            #expect(region.holes == [[start + 5 * pageSize, start + 8 * pageSize]], "\(region)")
        }
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
    }

    /// Into live memory: the backed pages hold the source's bytes and the
    /// pages past the end raise SIGBUS (the kernel cannot read them either),
    /// as in the source, never zeros.
    /// In this process's memory, and in another process's (`--into PID`).
    /// (Before, the check after post-copy read the holes: SIGBUS in this
    /// process, "cannot read pid N's migrated memory" for another.)
    @Test(arguments: [false, true])
    func pagesPastTheEndOfAFileRaiseSIGBUSInLiveMemory(intoAnotherProcess: Bool) async throws {
        let (child, mappings) = try Self.shortMemfdChild()
        defer { child.stop() }
        let destination = intoAnotherProcess ? try Memwriter(["--mib", "1"]) : nil
        defer { destination?.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
        var live = LiveMemoryOptions()
        live.targetPid = destination?.pid
        let sink = try LiveMemorySink(options: live)
        let summary = try await Leecher(connect: seeder.connector(), memory: sink, options: options).run()
        let memory = try await sink.migratedMemory()
        defer { memory.unmap() }
        let pid = destination?.pid ?? getpid()
        for start in mappings {
            let region = try #require(summary.manifest.regions.first { $0.start == start })
            #expect(region.holes == [[start + 5 * pageSize, start + 8 * pageSize]], "\(region)")
            let local = try #require(memory.localAddress(of: start))
            #expect(procMemory(pid: pid, at: local, length: 5 * 4096) == [UInt8](repeating: 0x42, count: 5 * 4096))
            for page in 5..<8 {
                #expect(procMemory(pid: pid, at: local + UInt64(page) * 4096, length: 4096) == nil,
                        "page \(page) past the end of the memfd reads in the destination")
            }
        }
    }
}
