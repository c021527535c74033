// ReadAt's reply, streamed in parts: runs of data, zero, unmapped and hole
// pages, then the bytes of the data runs (Protocols/migration.md).
import FerryToolkit

/// One run of a ReadAt reply part.
public struct PageRun: Sendable, Equatable {
    public var range: AddressRange
    public var kind: PageRunKind
    /// Offset of the run's bytes in the part (data runs only).
    public var dataOffset: Int
}

/// A ReadAt reply part: `u32 count`, then runs of `u64 start, u32 pages, u8 kind`,
/// then the bytes of the data runs in order.
public struct PagePart {
    /// Parses the run headers; the data stays in `bytes`, addressed by `dataOffset`.
    public static func parse(_ bytes: [UInt8]) throws -> [PageRun] {
        var r = WireReader(bytes)
        let count = Int(try r.u32("run count"))
        guard count <= MigrationLimits.pagesPerPart * 4, count * 13 <= r.remaining else {
            throw WireDecodeError("\(count) page runs in one part")
        }
        var headers: [(AddressRange, PageRunKind)] = []
        headers.reserveCapacity(count)
        for _ in 0..<count {
            let range = try r.range(maxPages: MigrationLimits.maxPagesPerRead)
            guard let kind = PageRunKind(rawValue: try r.u8("run kind")) else { throw WireDecodeError("unknown page run kind") }
            headers.append((range, kind))
        }
        var offset = r.offset
        var runs: [PageRun] = []
        runs.reserveCapacity(count)
        for (range, kind) in headers {
            runs.append(PageRun(range: range, kind: kind, dataOffset: offset))
            if kind == .data { offset += Int(range.length) }
        }
        guard offset == bytes.count else {
            throw WireDecodeError("page part carries \(bytes.count - r.offset) data bytes, its runs need \(offset - r.offset)")
        }
        return runs
    }

    /// Builds a part from pages read into `data` (laid out as `ranges` in order):
    /// all-zero pages become zero runs, unreadable ranges unmapped runs, and
    /// `holes` (mapped but unbacked) hole runs.
    public static func build(ranges: [AddressRange], data: UnsafeRawBufferPointer, unmapped: [AddressRange],
                             holes: [AddressRange] = []) -> [UInt8] {
        let holes = Ranges.merge(holes)
        let unmapped = Ranges.merge(unmapped)
        var runs: [(AddressRange, PageRunKind, Int)] = []  // range, kind, offset in data
        var dataOffset = 0
        for range in ranges {
            var page = range.start
            while page < range.end {
                let offset = dataOffset + Int(page - range.start)
                let kind: PageRunKind
                if Ranges.contains(holes, page) {
                    kind = .hole
                } else if Ranges.contains(unmapped, page) {
                    kind = .unmapped
                } else if isAllZero(UnsafeRawBufferPointer(rebasing: data[offset..<offset + Int(pageSize)])) {
                    kind = .zero
                } else {
                    kind = .data
                }
                if let last = runs.last, last.1 == kind, last.0.end == page {
                    runs[runs.count - 1].0.end = page + pageSize
                } else {
                    runs.append((AddressRange(start: page, end: page + pageSize), kind, offset))
                }
                page += pageSize
            }
            dataOffset += Int(range.length)
        }
        let dataBytes = runs.reduce(0) { $0 + ($1.1 == .data ? Int($1.0.length) : 0) }
        var w = WireWriter(capacity: 4 + runs.count * 13 + dataBytes)
        w.u32(UInt32(runs.count))
        for (range, kind, _) in runs {
            w.range(range)
            w.u8(kind.rawValue)
        }
        for (range, kind, offset) in runs where kind == .data {
            w.raw(UnsafeRawBufferPointer(rebasing: data[offset..<offset + Int(range.length)]))
        }
        return w.bytes
    }
}
