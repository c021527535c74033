// The migration protocol's numbers, limits and field encodings. Its messages
// live beside it: MigrationMessages.swift (Track, Hello, ReadAt, Checksum,
// Complete/Abort), PagePart.swift (ReadAt's reply parts) and DirtyReport.swift
// (Sync and Finalize). Normative description: Protocols/migration.md. Only
// the leecher (or a hub acting for it) calls.

/// RPC method numbers of the migration protocol.
public enum MigrationMethod: UInt16, Sendable, CaseIterable {
    case hello = 0x0100
    case track = 0x0101
    case readAt = 0x0102
    case sync = 0x0103
    case finalize = 0x0104
    case complete = 0x0105
    case abort = 0x0106
    case checksum = 0x0107
}

/// Limits of the migration protocol, checked before anything is allocated.
public enum MigrationLimits {
    public static let version: UInt16 = 3
    /// Page shifts a region may announce: 4 KiB pages up to 1 GiB hugetlb pages.
    public static let pageShifts: ClosedRange<UInt8> = 12...30
    /// Pages one ReadAt may ask for (4 MiB): big enough to amortize a round
    /// trip, small enough that one lost request costs little to ask again.
    public static let maxPagesPerRead = 1024
    /// Pages per streamed part of a ReadAt reply (1 MiB of data): the secure
    /// channel seals parts independently, so parts keep both cores busy.
    public static let pagesPerPart = 256
    /// Pages of one part holding a hugetlb page whole (2 MiB): the seeder
    /// re-protects a huge page only when it reads all of it at once, so it
    /// never splits one across parts. Larger huge pages (1 GiB) are read in
    /// 4 KiB pieces and stay dirty until the freeze.
    public static let hugePagesPerPart = 512
    /// Bytes one connection may hold for ReadAt requests being answered (a
    /// page buffer and a built part each, 2 MiB): 24 requests read at once,
    /// the rest wait. With the RPC send queue's 16 MiB, a peer that stops
    /// reading pins at most 64 MiB of a seeder or hub.
    public static let readBudgetPerConnection = 48 << 20
    /// What one ReadAt holds while it reads and sends a part.
    static let readAtHolds = 2 * pagesPerPart * Int(pageSize)
    /// What a ReadAt touching huge pages of `hugePagesPerPart` holds.
    static let hugeReadAtHolds = 2 * hugePagesPerPart * Int(pageSize)

    /// The migrated hugetlb regions of `layout` whose huge pages fit one part,
    /// ascending: the ones read (and requested) whole.
    static func wholeHugePages(in layout: [Region]) -> [Region] {
        layout.filter { $0.kind == .migrate && $0.isHugetlb && $0.pageSize <= UInt64(hugePagesPerPart) * pageSize }
    }
    /// Ranges in one request or one streamed part of a range list.
    public static let maxRangesPerMessage = 65_536
    /// Regions in a layout: the kernel's default vm.max_map_count is 65,530.
    public static let maxRegions = 262_144
    /// Memory a layout may ask to migrate: 1 TiB. The leecher keeps a few
    /// bytes of state per page (about 800 MB for 1 TiB); a larger layout is
    /// taken for a hostile or broken peer.
    public static let maxMigratableBytes: UInt64 = 1 << 40
    /// Bytes one streamed reply may carry in all: a ReadAt's pages and run
    /// headers, or for Sync and Finalize a layout and a dirty report.
    static func maxReplyBytes(_ method: MigrationMethod) -> Int {
        method == .readAt ? maxPagesPerRead * Int(pageSize) + (1 << 20) : 64 << 20
    }
    /// Longest region name or host name carried.
    public static let maxName = 4096
}

/// Where the seeder's session stands.
public enum SessionPhase: UInt8, Sendable, CustomStringConvertible {
    case tracking = 0
    case frozen = 1
    case completed = 2
    case aborted = 3

    public var description: String {
        switch self {
        case .tracking: return "tracking"
        case .frozen: return "frozen"
        case .completed: return "completed"
        case .aborted: return "aborted"
        }
    }
}

/// How a ReadAt reply describes a run of pages.
public enum PageRunKind: UInt8, Sendable {
    /// Followed by the pages' bytes.
    case data = 0
    /// All-zero pages: no bytes follow.
    case zero = 1
    /// Not mapped in the source any more: no bytes follow.
    case unmapped = 2
    /// Mapped, but nothing backs it (past the end of its file or shared
    /// memory object): the source gets SIGBUS there, and so must the
    /// destination. No bytes follow.
    case hole = 3
}

// MARK: - Encoding helpers

extension WireWriter {
    mutating func range(_ r: AddressRange) {
        u64(r.start)
        u32(UInt32(r.pageCount))
    }

    mutating func ranges(_ list: [AddressRange]) {
        u32(UInt32(list.count))
        for r in list { range(r) }
    }

    mutating func text(_ s: String) {
        bytes16(Array(s.utf8.prefix(MigrationLimits.maxName)))
    }

    mutating func regions(_ list: [Region]) {
        u32(UInt32(list.count))
        for r in list {
            u64(r.start)
            u64(r.end)
            text(r.permissions)
            u64(r.offset)
            text(r.device)
            u64(r.inode)
            text(r.name)
            u8(r.kind == .migrate ? 0 : r.kind == .recordOnly ? 1 : 2)
            u8(UInt8(r.pageSize.trailingZeroBitCount))
        }
    }
}

extension WireReader {
    mutating func range(maxPages: Int = .max) throws -> AddressRange {
        let start = try u64("range start")
        let pages = Int(try u32("range pages"))
        guard start % pageSize == 0 else {
            throw WireDecodeError("range start 0x\(String(start, radix: 16)) is not page aligned")
        }
        guard pages > 0, pages <= maxPages else {
            throw WireDecodeError("range of \(pages) pages, allowed 1...\(maxPages)")
        }
        let (end, overflow) = start.addingReportingOverflow(UInt64(pages) * pageSize)
        guard !overflow else { throw WireDecodeError("range at 0x\(String(start, radix: 16)) wraps around") }
        return AddressRange(start: start, end: end)
    }

    mutating func ranges(maxPages: Int = .max) throws -> [AddressRange] {
        let count = Int(try u32("range count"))
        guard count <= MigrationLimits.maxRangesPerMessage else {
            throw WireDecodeError("\(count) ranges, limit \(MigrationLimits.maxRangesPerMessage)")
        }
        guard count * 12 <= remaining else { throw WireDecodeError("\(count) ranges announced, message too short") }
        var out: [AddressRange] = []
        out.reserveCapacity(count)
        for _ in 0..<count { out.append(try range(maxPages: maxPages)) }
        return out
    }

    mutating func text(_ field: String) throws -> String {
        String(decoding: try bytes16(field, limit: MigrationLimits.maxName), as: UTF8.self)
    }

    mutating func regions() throws -> [Region] {
        let count = Int(try u32("region count"))
        guard count <= MigrationLimits.maxRegions else {
            throw WireDecodeError("\(count) regions, limit \(MigrationLimits.maxRegions)")
        }
        guard count * 40 <= remaining else { throw WireDecodeError("\(count) regions announced, message too short") }
        var out: [Region] = []
        out.reserveCapacity(count)
        for _ in 0..<count {
            let start = try u64("region start")
            let end = try u64("region end")
            guard start <= end, start % pageSize == 0, end % pageSize == 0 else {
                throw WireDecodeError("region 0x\(String(start, radix: 16))-0x\(String(end, radix: 16)) is not a page-aligned range")
            }
            let permissions = try text("permissions")
            let offset = try u64("offset")
            let device = try text("device")
            let inode = try u64("inode")
            let name = try text("name")
            let kind: RegionKind
            switch try u8("kind") {
            case 0: kind = .migrate
            case 1: kind = .recordOnly
            case 2: kind = .skip
            case let other: throw WireDecodeError("unknown region kind \(other)")
            }
            // log2 of the region's page size: 12 (4 KiB) up to 30 (1 GiB hugetlb pages).
            let shift = try u8("page shift")
            guard MigrationLimits.pageShifts.contains(shift) else {
                throw WireDecodeError("region 0x\(String(start, radix: 16)) has page shift \(shift), allowed \(MigrationLimits.pageShifts)")
            }
            let regionPageSize = UInt64(1) << shift
            guard start % regionPageSize == 0, end % regionPageSize == 0 else {
                throw WireDecodeError("region 0x\(String(start, radix: 16))-0x\(String(end, radix: 16)) is not aligned to its \(regionPageSize >> 10) KiB pages")
            }
            if let previous = out.last, start < previous.end {
                throw WireDecodeError("region 0x\(String(start, radix: 16))-0x\(String(end, radix: 16)) overlaps or precedes 0x\(String(previous.start, radix: 16))-0x\(String(previous.end, radix: 16)): a layout is sorted and without overlaps")
            }
            out.append(Region(range: AddressRange(start: start, end: end), permissions: permissions, offset: offset,
                              device: device, inode: inode, name: name, kind: kind, pageSize: regionPageSize))
        }
        let migratable = out.reduce(UInt64(0)) { $0 + ($1.kind == .migrate ? $1.range.length : 0) }
        guard migratable <= MigrationLimits.maxMigratableBytes else {
            throw WireDecodeError("the layout has \(migratable >> 30) GiB to migrate, over the limit of \(MigrationLimits.maxMigratableBytes >> 30) GiB")
        }
        return out
    }
}
