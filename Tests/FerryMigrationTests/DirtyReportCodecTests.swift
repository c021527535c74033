import Foundation
import Testing
@testable import FerryMigration

private func pages(_ start: UInt64, _ count: UInt64) -> AddressRange {
    AddressRange(start: start, end: start + count * pageSize)
}

@Suite struct DirtyReportCodecTests {
    func roundTrip(_ dirty: [AddressRange]) throws -> (parts: [[UInt8]], decoded: [AddressRange]) {
        let parts = DirtyReportCodec.parts(epoch: 7, layout: nil, dirty: dirty, rate: 11, freeze: 13)
        let report = try DirtyReportCodec.decode(parts)
        #expect(report.epoch == 7 && report.rate == 11 && report.freeze == 13 && report.layout == nil)
        return (parts, report.dirty)
    }

    @Test func scatteredPagesGoAsABitmap() throws {
        // Every third page of 1 GiB: 87k ranges, 1 MiB as a range list.
        let base: UInt64 = 0x7f00_0000_0000
        let dirty = stride(from: UInt64(0), to: 262_144, by: 3).map { pages(base + $0 * pageSize, 1) }
        let (parts, decoded) = try roundTrip(dirty)
        #expect(decoded == dirty)
        let bytes = parts.dropFirst().reduce(0) { $0 + $1.count }
        #expect(bytes < 262_144 / 8 + 100, "\(bytes) bytes for a 32 KiB bitmap")
        #expect(parts.dropFirst().allSatisfy { $0.first == DirtyReportCodec.Encoding.bitmap.rawValue })
    }

    @Test func longRunsAndDistantPagesGoAsRanges() throws {
        let dirty = [pages(0x10000, 500), pages(0x5555_0000_0000, 1), pages(0x7ffd_0000_0000, 32)]
        let (parts, decoded) = try roundTrip(dirty)
        #expect(decoded == dirty)
        #expect(parts.count == 2)
        #expect(parts[1].first == DirtyReportCodec.Encoding.ranges.rawValue)
    }

    @Test func aMixKeepsAddressOrder() throws {
        var dirty = (0..<400).map { pages(0x100000 + UInt64($0) * 2 * pageSize, 1) }
        dirty.append(pages(0x9000_0000, 300))
        dirty += (0..<50).map { pages(0xa000_0000 + UInt64($0) * 2 * pageSize, 1) }
        let (_, decoded) = try roundTrip(dirty)
        #expect(decoded == dirty)
        let (_, none) = try roundTrip([])
        #expect(none.isEmpty)
    }

    @Test func malformedReportsAreRefused() throws {
        let good = DirtyReportCodec.parts(epoch: 1, layout: nil, dirty: [pages(0x1000, 2)], rate: 0, freeze: 0)
        // A part dropped: fewer pages than announced.
        #expect(throws: WireDecodeError.self) { try DirtyReportCodec.decode([good[0]]) }
        // Unknown encoding.
        var unknown = good
        unknown[1][0] = 9
        #expect(throws: WireDecodeError.self) { try DirtyReportCodec.decode(unknown) }
        // A bitmap wider than the limit, announced before its bytes.
        var w = WireWriter()
        w.u8(DirtyReportCodec.Encoding.bitmap.rawValue)
        w.u64(0x1000)
        w.u32(UInt32(DirtyReportCodec.maxBitmapPages + 1))
        #expect(throws: WireDecodeError.self) { try DirtyReportCodec.decode([good[0], w.bytes]) }
        // A bitmap shorter than it says.
        var short = WireWriter()
        short.u8(DirtyReportCodec.Encoding.bitmap.rawValue)
        short.u64(0x1000)
        short.u32(64)
        short.raw([0xff])
        #expect(throws: WireDecodeError.self) { try DirtyReportCodec.decode([good[0], short.bytes]) }
    }
}
