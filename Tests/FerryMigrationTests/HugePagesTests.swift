// Hugetlb memory (MAP_HUGETLB, SysV SHM_HUGETLB, memfd MFD_HUGETLB) is
// write-protected, scanned and read by the kernel only in whole huge pages.
// Before the fix the first re-arm of a read that ended inside a 2 MiB page
// failed (UFFDIO_WRITEPROTECT: Invalid argument) and aborted the migration
// (issue 15, class 2). Here a process writes to all three kinds while it
// migrates, under each tracker, and the image must match the frozen source
// byte for byte and record the regions' page size.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct HugePagesTests {
    static let hugePage: UInt64 = 2 << 20

    @Test(arguments: [TrackerKind.async, TrackerKind.sync])
    func hugetlbRegionsMigrateByteExactUnderWrites(tracker: TrackerKind) async throws {
        // 8 + 4 + 4 pages for the process, and room for the reads of the
        // pages it has not touched yet (hugemem fills every page first).
        let pool = HugePagePool(pages: 24)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let process = try Hugemem(["--private", "8", "--shm", "4", "--memfd", "4", "--pause-us", "20"])
        defer { process.stop() }
        if let refused = process.refused {
            Issue.record("hugemem could not map its huge pages although the pool has them: \(refused)")
            return
        }
        let tracked = try TrackedProcess.attach(pid: process.pid, tracker: tracker)
        let hugeRegions = tracked.regions.filter(\.isHugetlb)
        #expect(hugeRegions.count == 3, "\(tracked.regions.filter { $0.pageSize != 4096 })")
        for region in hugeRegions { #expect(region.pageSize == Self.hugePage, "\(region)") }

        let seeder = try await LoopbackSeeder(process: tracked)
        defer { seeder.close() }
        let out = scratchDirectory("hugetlb-\(tracker.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        // Small requests, so reads end inside huge pages: what used to fail.
        options.pagesPerRequest = 96
        options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        let summary = try await leecher.run()

        for (name, range) in process.regions {
            let region = try #require(summary.manifest.regions.first { $0.start == range.start }, "\(name)")
            #expect(region.end == range.end, "\(name)")
            #expect(region.file != nil, "\(name) was not copied")
            #expect(region.pageSize == Self.hugePage, "\(name): \(region)")
        }
        // Ordinary regions keep the manifest's page size (no field).
        #expect(summary.manifest.regions.filter { $0.pageSize != nil }.count == 3)
        // The writer kept writing until the freeze: whole huge pages were dirty then.
        #expect(summary.dirtyPagesAtFinalize >= 512, "\(summary.dirtyPagesAtFinalize) dirty pages at Finalize")
        let report = try ImageVerifier.compare(directory: out, pid: process.pid)
        #expect(report.matches, "\(report)")
        let again = try Manifest.load(directory: out)
        #expect(again.regions.filter { $0.pageSize == Self.hugePage }.count == 3)
    }
}

/// The page size in the layout (protocol version 3) and the refusal of live memory.
@Suite struct HugePageLayoutTests {
    static let huge = Region(range: AddressRange(start: 0x7f00_0000_0000, end: 0x7f00_0040_0000), permissions: "rw-p",
                             offset: 0, device: "00:11", inode: 7, name: "/anon_hugepage (deleted)", kind: .migrate,
                             pageSize: 2 << 20)
    static let plain = Region(range: AddressRange(start: 0x7f00_0040_0000, end: 0x7f00_0040_3000), permissions: "rw-p",
                              offset: 0, device: "00:00", inode: 0, name: "", kind: .migrate)

    func headWithLayout(_ layout: [Region]) -> [[UInt8]] {
        DirtyReportCodec.parts(epoch: 2, layout: layout, dirty: [], rate: 0, freeze: 0)
    }

    @Test func theLayoutCarriesEachRegionsPageSize() throws {
        let decoded = try DirtyReportCodec.decode(headWithLayout([Self.huge, Self.plain]))
        #expect(decoded.layout == [Self.huge, Self.plain])
        #expect(decoded.layout?.map(\.pageSize) == [2 << 20, 4096])
    }

    @Test func aPageShiftOutOfRangeOrAMisalignedHugeRegionIsRefused() throws {
        for shift: UInt8 in [0, 11, 31, 63] {
            var parts = headWithLayout([Self.huge])
            parts[0][parts[0].count - 1] = shift
            #expect(throws: WireDecodeError.self, "shift \(shift)") { try DirtyReportCodec.decode(parts) }
        }
        var misaligned = Self.huge
        misaligned.range = AddressRange(start: Self.huge.start + 4096, end: Self.huge.end)
        #expect(throws: WireDecodeError.self) { try DirtyReportCodec.decode(headWithLayout([misaligned])) }
    }

    @Test func liveMemoryRefusesHugetlbRegionsByName() throws {
        #expect(throws: Never.self) { try LiveMemorySink.checkSupported([Self.plain]) }
        do {
            try LiveMemorySink.checkSupported([Self.plain, Self.huge])
            Issue.record("a hugetlb region was accepted")
        } catch {
            let text = "\(error)"
            #expect(text.contains("0x7f0000000000-0x7f0000400000") && text.contains("/anon_hugepage")
                    && text.contains("2048 KiB") && text.contains("--out"), "\(text)")
        }
    }
}

extension HugePagesTests {
    /// `--into` (live memory) refuses a source with huge pages right after
    /// Track, before anything is pulled or frozen: the source runs on.
    @Test func postCopyIntoLiveMemoryRefusesHugePagesAndTheSourceRunsOn() async throws {
        let pool = HugePagePool(pages: 4)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let process = try Hugemem(["--private", "2", "--pause-us", "1000"])
        defer { process.stop() }
        try #require(process.refused == nil, "\(process.refused ?? "")")
        let tracked = try TrackedProcess.attach(pid: process.pid)
        let seeder = try await LoopbackSeeder(process: tracked)
        defer { seeder.close() }
        let leecher = Leecher(connect: seeder.connector(), memory: try LiveMemorySink(), options: LeecherOptions())
        do {
            _ = try await leecher.run()
            Issue.record("live memory took a hugetlb region")
        } catch {
            #expect("\(error)".contains("hugetlb memory in 2048 KiB pages"), "\(error)")
        }
        // Not frozen, not stopped: it still answers and still writes.
        process.send("count")
        let first = try process.expect("count")
        try await Task.sleep(for: .milliseconds(50))
        process.send("count")
        let second = try process.expect("count")
        #expect(first != second, "\(first) / \(second)")
    }
}
