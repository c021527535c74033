// Cutting protection requests at hugetlb boundaries: UFFDIO_WRITEPROTECT
// refuses a request that touches a hugetlb mapping unless its start and
// length are multiples of the huge page size.
import Testing
import FerryTestSupport
@testable import FerrySystem

@Suite struct HugePageMapTests {
    let mib2: UInt64 = 2 << 20

    @Test func requestsAreCutAtHugetlbEdgesAndAlignedToTheirPages() {
        var map = HugePageMap()
        let huge = AddressRange(start: 0x4000_0000, end: 0x4000_0000 + 4 * mib2)
        map.add(huge, size: mib2)
        // Ordinary memory before, a partial huge page, whole ones, and ordinary memory after.
        let request = AddressRange(start: huge.start - 0x3000, end: huge.end + 0x2000)
        #expect(map.split([request]) == [
            AddressRange(start: huge.start - 0x3000, end: huge.start),
            huge,
            AddressRange(start: huge.end, end: huge.end + 0x2000),
        ])
        let inside = AddressRange(start: huge.start + mib2 + 0x5000, end: huge.start + mib2 + 0x9000)
        #expect(map.split([inside]) == [AddressRange(start: huge.start + mib2, end: huge.start + 2 * mib2)])
        #expect(map.page(at: inside.start) == AddressRange(start: huge.start + mib2, end: huge.start + 2 * mib2))
        #expect(map.page(at: huge.end) == AddressRange(start: huge.end, end: huge.end + pageSize))
        #expect(map.pages(of: AddressRange(start: huge.end - mib2, end: huge.end + 0x2000)).count == 3)
        map.remove(huge)
        #expect(map.isEmpty)
        #expect(map.split([inside]) == [inside])
    }

    @Test func alignment() {
        let range = AddressRange(start: mib2 - 0x1000, end: 3 * mib2 + 0x1000)
        #expect(range.aligned(inwardTo: mib2) == AddressRange(start: mib2, end: 3 * mib2))
        #expect(range.aligned(outwardTo: mib2) == AddressRange(start: 0, end: 4 * mib2))
        #expect(AddressRange(start: 0x1000, end: 0x3000).aligned(inwardTo: mib2) == nil)
    }

    /// Both ways of learning a region's page size agree on a real process:
    /// statfs of map_files (what `read` uses as root) and smaps.
    @Test func processMapsFindsHugetlbRegionsAndTheirPageSize() throws {
        let pool = HugePagePool(pages: 6)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let process = try Hugemem(["--private", "2", "--shm", "2", "--memfd", "2", "--pause-us", "1000"])
        defer { process.stop() }
        try #require(process.refused == nil, "\(process.refused ?? "")")
        let regions = try ProcessMaps.read(pid: process.pid)
        let smaps = try ProcessMaps.kernelPageSizes(pid: process.pid)
        for (name, range) in process.regions {
            let region = try #require(regions.first { $0.range == range }, "\(name)")
            #expect(region.pageSize == mib2 && region.kind == .migrate, "\(name): \(region)")
            #expect(smaps[range.start] == mib2, "\(name)")
        }
        #expect(regions.filter(\.isHugetlb).count == 3)
        for region in regions where !region.isHugetlb { #expect(smaps[region.start] == nil || smaps[region.start] == 4096, "\(region)") }
    }
}
