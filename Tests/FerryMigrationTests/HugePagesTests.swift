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
        // The writer kept writing until the freeze.
        let report = try ImageVerifier.compare(directory: out, pid: process.pid)
        #expect(report.matches, "\(report)")
        let again = try Manifest.load(directory: out)
        #expect(again.regions.filter { $0.pageSize == Self.hugePage }.count == 3)
    }
}
