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

/// The trackers on hugetlb memory: whole huge pages are protected, a write
/// dirties its whole huge page, and a huge page read in part stays dirty.
/// Before the fix the first read (re-arm) failed with EINVAL.
@Suite(.serialized) struct HugetlbTrackingTests {
    static let mib2: UInt64 = 2 << 20

    @Test(arguments: [TrackerKind.async, TrackerKind.sync])
    func writesDirtyWholeHugePagesAndPartReadsStayDirty(tracker: TrackerKind) throws {
        let pool = HugePagePool(pages: 8)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let process = try Hugemem(["--private", "4", "--shm", "2", "--writer", "0"])
        defer { process.stop() }
        try #require(process.refused == nil, "\(process.refused ?? "")")
        let tracked = try TrackedProcess.attach(pid: process.pid, tracker: tracker)
        defer { try? tracked.detach() }
        try tracked.startTracking()
        #expect(tracked.unprotectable.filter(\.isHugetlb).isEmpty, "\(tracked.unprotectable)")
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 * Int(Self.mib2), alignment: 4096)
        defer { buffer.deallocate() }

        for name in ["private", "shm"] {
            let region = try #require(process.regions[name])
            let first = AddressRange(start: region.start, end: region.start + Self.mib2)
            let second = AddressRange(start: first.end, end: first.end + Self.mib2)
            func dirty() throws -> [AddressRange] {
                Ranges.intersect(try tracked.scanDirty(rearm: false), [region])
            }
            // Whole huge pages read (re-armed) and not written: clean.
            _ = try tracked.read([first, second], into: buffer)
            #expect(try dirty() == [], "\(name) after reading whole pages")
            // One 8-byte write in the middle dirties its whole huge page.
            process.send("poke 0x" + String(first.start + Self.mib2 / 2 + 8, radix: 16))
            _ = try process.expect("poked")
            #expect(try dirty() == [first], "\(name) after a write")
            // A read of part of the second huge page does not re-arm it: the
            // next scan reports all of it, so the pages read earlier are sent again.
            _ = try tracked.read([AddressRange(start: second.start + 0x3000, end: second.start + 0x5000)],
                                 into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<0x2000]))
            // (The async tracker reports the first page again too: nothing re-armed it.)
            #expect(Ranges.subtract([second], try dirty()).isEmpty, "\(name) after a partial read")
            // Read whole again: clean again, and a write there is seen again.
            _ = try tracked.read([first, second], into: buffer)
            #expect(try dirty() == [], "\(name) after reading whole pages again")
            process.send("poke 0x" + String(second.end - 8, radix: 16))
            _ = try process.expect("poked")
            #expect(try dirty() == [second], "\(name) after a write to the last word")
        }
    }
}
