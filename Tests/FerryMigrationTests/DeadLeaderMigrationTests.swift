// A process whose main thread has exited while two threads write migrates
// byte-exact (issue 15, class 4): before, attaching said "the process exited
// while attaching" and there was no way in.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct DeadLeaderMigrationTests {
    @Test(arguments: [TrackerKind.async, TrackerKind.sync])
    func aProcessWhoseMainThreadExitedMigratesByteExact(tracker: TrackerKind) async throws {
        let child = try DeadLeader(mib: 8, rate: 20000)
        defer { child.stop() }
        #expect(child.leaderState == "Z")
        let process = try TrackedProcess.attach(pid: child.pid, tracker: tracker)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory("deadleader-\(tracker.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        let summary = try await leecher.run()
        #expect(await seeder.service.outcome() == .completed("pid \(child.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"))
        // Byte-exact against the stopped source, read through a live thread.
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
        for (name, range) in child.regions {
            #expect(summary.manifest.regions.contains { $0.file != nil && $0.start <= range.start && range.end <= $0.end },
                    "\(name) \(range) is in the image")
        }
        // The writers' regions hold their non-zero data in the image.
        let writer1 = try #require(child.regions["writer1"])
        let entry = try #require(summary.manifest.regions.first { $0.start <= writer1.start && writer1.end <= $0.end })
        let data = try Data(contentsOf: URL(fileURLWithPath: out + "/" + (entry.file ?? "")))
        let offset = Int(writer1.start - entry.start)
        let zeros = data[offset..<offset + Int(writer1.length)].withUnsafeBytes { $0.bindMemory(to: UInt64.self).filter { $0 == 0 }.count }
        #expect(zeros == 0)
        #expect(summary.bytesReceived >= writer1.length)
    }

    /// The main thread exits in the middle of the migration: the seeder
    /// carries on through the threads that remain.
    @Test func theMainThreadExitingDuringTheMigrationChangesNothing() async throws {
        let child = try DeadLeader(mib: 32, rate: 20000, leaderWaits: true)
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid, tracker: .async)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory("deadleader-midway")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.99, maxWaitSeconds: 10)
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        let run = Task { try await leecher.run() }
        try await Task.sleep(for: .milliseconds(50))
        try child.exitLeader()
        let summary = try await run.value
        #expect(child.leaderState == "Z")
        #expect(await seeder.service.outcome() == .completed("pid \(child.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"))
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
        #expect(summary.bytesReceived >= 64 << 20)
    }

    /// Post-copy into a live target whose main thread has exited: the
    /// regions are mapped and the userfaultfd made through a live thread.
    @Test func memoryIsPlacedIntoAProcessWhoseMainThreadExited() async throws {
        let source = try Memwriter(["--mib", "8", "--threads", "2", "--rate", "20000", "--pattern"])
        defer { source.stop() }
        let destination = try DeadLeader(mib: 1, rate: 1000) // stands for a restored program
        defer { destination.stop() }
        try TrackedProcess.checkAttachable(pid: destination.pid)
        // The leecher's verification reads the destination's memory through a live thread.
        let memory = try await pullIntoAnotherProcess(source: source.pid, destination: destination.pid)
        let main = try #require(source.regions["main"])
        let mapping = try #require(memory.mappings.first { $0.source.start <= main.start && main.end <= $0.source.end })
        let reader = try PageReader(pid: destination.pid)
        let sourceReader = try PageReader(pid: source.pid)
        var here = [UInt8](repeating: 0, count: 1 << 20)
        var there = [UInt8](repeating: 1, count: 1 << 20)
        let offset = main.start - mapping.source.start
        try here.withUnsafeMutableBytes {
            _ = try reader.read([AddressRange(start: mapping.local + offset, end: mapping.local + offset + (1 << 20))], into: $0)
        }
        try there.withUnsafeMutableBytes { _ = try sourceReader.read([AddressRange(start: main.start, end: main.start + (1 << 20))], into: $0) }
        #expect(here == there, "the destination holds the frozen source's bytes")
    }
}
