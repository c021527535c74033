// The dirty report that answers Sync and Finalize: the layout epoch, the
// layout when it changed, and the pages written since they were sent, as
// range or bitmap parts, whichever is smaller (Protocols/migration.md 3.3).

/// Sync: the dirty report of pre-copy. The request carries the layout epoch
/// the leecher knows; the reply carries the layout only when it changed.
public struct SyncReply: Sendable, Equatable {
    public var layoutEpoch: UInt64
    public var layout: [Region]?
    /// Pages sent and written since (all of them, not only new ones).
    public var dirty: [AddressRange]
    /// Pages the seeder found written in its scans per second, recently.
    public var dirtyPagesPerSecond: UInt64

    public init(layoutEpoch: UInt64, layout: [Region]?, dirty: [AddressRange], dirtyPagesPerSecond: UInt64) {
        self.layoutEpoch = layoutEpoch
        self.layout = layout
        self.dirty = dirty
        self.dirtyPagesPerSecond = dirtyPagesPerSecond
    }
}

/// Finalize: the process is frozen; the final layout and dirty set.
public struct FinalizeReply: Sendable, Equatable {
    public var layoutEpoch: UInt64
    public var layout: [Region]
    public var dirty: [AddressRange]
    public var freezeMicroseconds: UInt64

    public init(layoutEpoch: UInt64, layout: [Region], dirty: [AddressRange], freezeMicroseconds: UInt64) {
        self.layoutEpoch = layoutEpoch
        self.layout = layout
        self.dirty = dirty
        self.freezeMicroseconds = freezeMicroseconds
    }
}

/// The streamed dirty report of Sync and Finalize (Protocols/migration.md
/// 3.3): a head part with the fixed fields and the layout, then parts of at
/// most `maxRangesPerMessage` dirty ranges or `maxBitmapPages` pages each.
public enum DirtyReportCodec {
    /// How a part of a dirty report lists its pages.
    public enum Encoding: UInt8, Sendable {
        /// `u32 count` then `count` ranges: cheapest for long runs.
        case ranges = 0
        /// `u64 base, u32 pages` then one bit per page from `base`, least
        /// significant bit first: cheapest for scattered pages (one bit a
        /// page against 12 bytes a range).
        case bitmap = 1
    }

    /// Pages one bitmap part may span: 4 GiB of address space in 128 KiB.
    public static let maxBitmapPages = 1 << 20
    /// A gap of this many clean pages costs a bitmap as much as starting a
    /// new range does (12 bytes): wider gaps end a bitmap group.
    static let bitmapGapPages: UInt64 = 96

    public static func parts(epoch: UInt64, layout: [Region]?, dirty: [AddressRange], rate: UInt64, freeze: UInt64) -> [[UInt8]] {
        var head = WireWriter(capacity: 64 + (layout?.count ?? 0) * 64)
        head.u64(epoch)
        head.u64(rate)
        head.u64(freeze)
        head.u64(dirty.reduce(0) { $0 + $1.pageCount })
        if let layout {
            head.u8(1)
            head.regions(layout)
        } else {
            head.u8(0)
        }
        var out = [head.bytes]
        var pending: [AddressRange] = []
        func flushRanges() {
            var index = 0
            while index < pending.count {
                let slice = pending[index..<min(pending.count, index + MigrationLimits.maxRangesPerMessage)]
                var w = WireWriter(capacity: 5 + slice.count * 12)
                w.u8(Encoding.ranges.rawValue)
                w.ranges(Array(slice))
                out.append(w.bytes)
                index += slice.count
            }
            pending.removeAll(keepingCapacity: true)
        }
        // Group ranges lying close together; each group goes as a bitmap when
        // that is smaller than its ranges.
        var index = 0
        let sorted = dirty.sorted { $0.start < $1.start }
        while index < sorted.count {
            let base = sorted[index].start
            var end = sorted[index].end
            var next = index + 1
            while next < sorted.count, sorted[next].start >= end,
                  (sorted[next].start - end) / pageSize <= bitmapGapPages,
                  (sorted[next].end - base) / pageSize <= UInt64(maxBitmapPages) {
                end = sorted[next].end
                next += 1
            }
            let span = Int((end - base) / pageSize)
            if 13 + (span + 7) / 8 < 12 * (next - index) {
                flushRanges()
                var bits = [UInt8](repeating: 0, count: (span + 7) / 8)
                for range in sorted[index..<next] {
                    var page = Int((range.start - base) / pageSize)
                    let last = Int((range.end - base) / pageSize)
                    while page < last {
                        bits[page >> 3] |= 1 << UInt8(page & 7)
                        page += 1
                    }
                }
                var w = WireWriter(capacity: 13 + bits.count)
                w.u8(Encoding.bitmap.rawValue)
                w.u64(base)
                w.u32(UInt32(span))
                w.raw(bits)
                out.append(w.bytes)
            } else {
                pending.append(contentsOf: sorted[index..<next])
            }
            index = next
        }
        flushRanges()
        return out
    }

    public static func decode(_ parts: [[UInt8]]) throws -> (epoch: UInt64, layout: [Region]?, dirty: [AddressRange], rate: UInt64, freeze: UInt64) {
        guard let first = parts.first else { throw WireDecodeError("empty dirty report") }
        var r = WireReader(first)
        let epoch = try r.u64("layout epoch")
        let rate = try r.u64("dirty rate")
        let freeze = try r.u64("freeze time")
        let announced = try r.u64("dirty page count")
        let layout: [Region]? = try r.u8("layout flag") == 1 ? r.regions() : nil
        try r.expectEnd("dirty report head")
        var dirty: [AddressRange] = []
        var pages: UInt64 = 0
        for part in parts.dropFirst() {
            var pr = WireReader(part)
            switch Encoding(rawValue: try pr.u8("dirty part encoding")) {
            case .ranges:
                let list = try pr.ranges()
                for range in list { pages += range.pageCount }
                guard pages <= announced else { throw WireDecodeError("more dirty pages than the \(announced) announced") }
                dirty += list
            case .bitmap:
                let base = try pr.u64("bitmap base")
                let span = Int(try pr.u32("bitmap pages"))
                guard base % pageSize == 0, span > 0, span <= maxBitmapPages else {
                    throw WireDecodeError("dirty bitmap at 0x\(String(base, radix: 16)) of \(span) pages: base must be page aligned and 1...\(maxBitmapPages) pages")
                }
                guard base.addingReportingOverflow(UInt64(span) * pageSize).overflow == false else {
                    throw WireDecodeError("dirty bitmap at 0x\(String(base, radix: 16)) wraps around")
                }
                let bits = try pr.raw((span + 7) / 8, "dirty bitmap")
                var page = 0
                while page < span {
                    guard bits[page >> 3] & (1 << UInt8(page & 7)) != 0 else { page += 1; continue }
                    var last = page + 1
                    while last < span && bits[last >> 3] & (1 << UInt8(last & 7)) != 0 { last += 1 }
                    pages += UInt64(last - page)
                    guard pages <= announced else { throw WireDecodeError("more dirty pages than the \(announced) announced") }
                    dirty.append(AddressRange(start: base + UInt64(page) * pageSize, end: base + UInt64(last) * pageSize))
                    page = last
                }
            case nil:
                throw WireDecodeError("unknown dirty part encoding")
            }
            try pr.expectEnd("dirty part")
        }
        guard pages == announced else {
            throw WireDecodeError("dirty report announced \(announced) pages, carried \(pages)")
        }
        return (epoch, layout, dirty, rate, freeze)
    }
}
