// The migration's messages, carried as RPC payloads. Normative description:
// Protocols/migration.md. Only the leecher (or a hub acting for it) calls.

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

// MARK: - Messages

/// Track: start (or resume) the migration session.
public struct TrackRequest: Sendable, Equatable {
    public var version: UInt16 = MigrationLimits.version
    /// The session to resume after a dropped connection; nil starts a new one.
    public var resume: [UInt8]?
    /// The migration wanted, by name; empty for whatever the peer serves.
    /// A hub serving several seeders routes by it.
    public var migration: String

    /// A second connection to the session `resume` names, for priority
    /// reads beside the owner's bulk traffic (post-copy's touched pages): it
    /// may only ReadAt, and takes nothing from the owning connection.
    public var companion: Bool

    public init(resume: [UInt8]? = nil, migration: String = "", companion: Bool = false) {
        self.resume = resume
        self.migration = migration
        self.companion = companion
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u16(version)
        w.bytes16(resume ?? [])
        w.text(migration)
        w.u8(companion ? 1 : 0)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> TrackRequest {
        var r = WireReader(bytes)
        let version = try r.u16("version")
        let resume = try r.bytes16("session", limit: 16)
        let migration = try r.text("migration")
        let flags = try r.u8("flags")
        guard flags <= 1 else { throw WireDecodeError("unknown Track flags 0x\(String(flags, radix: 16))") }
        try r.expectEnd("Track request")
        var request = TrackRequest(resume: resume.isEmpty ? nil : resume, migration: migration, companion: flags == 1)
        guard !request.companion || request.resume != nil else {
            throw WireDecodeError("a companion Track must name the session it joins")
        }
        request.version = version
        return request
    }
}

/// Hello: who serves what, with no side effect (a hub asks a seeder that
/// dialed in before any leecher wants it).
public struct HelloReply: Sendable, Equatable {
    public var migration: String
    public var pid: Int32
    public var host: String
    /// The session's phase, nil before any Track.
    public var phase: SessionPhase?

    public init(migration: String, pid: Int32, host: String, phase: SessionPhase?) {
        self.migration = migration
        self.pid = pid
        self.host = host
        self.phase = phase
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.text(migration)
        w.u32(UInt32(bitPattern: pid))
        w.text(host)
        w.u8(phase?.rawValue ?? 0xFF)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> HelloReply {
        var r = WireReader(bytes)
        let migration = try r.text("migration")
        let pid = Int32(bitPattern: try r.u32("pid"))
        let host = try r.text("host")
        let raw = try r.u8("phase")
        try r.expectEnd("Hello reply")
        guard raw == 0xFF || SessionPhase(rawValue: raw) != nil else { throw WireDecodeError("unknown session phase \(raw)") }
        return HelloReply(migration: migration, pid: pid, host: host, phase: SessionPhase(rawValue: raw))
    }
}

public struct TrackReply: Sendable, Equatable {
    public var session: [UInt8]
    public var phase: SessionPhase
    public var pid: Int32
    public var host: String
    public var tracker: String
    /// How long the seeder keeps a session whose leecher is gone, in milliseconds.
    public var graceMilliseconds: UInt32
    public var layoutEpoch: UInt64
    public var layout: [Region]

    public init(session: [UInt8], phase: SessionPhase, pid: Int32, host: String, tracker: String,
                graceMilliseconds: UInt32, layoutEpoch: UInt64, layout: [Region]) {
        self.session = session
        self.phase = phase
        self.pid = pid
        self.host = host
        self.tracker = tracker
        self.graceMilliseconds = graceMilliseconds
        self.layoutEpoch = layoutEpoch
        self.layout = layout
    }

    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 256 + layout.count * 64)
        w.bytes16(session)
        w.u8(phase.rawValue)
        w.u32(UInt32(bitPattern: pid))
        w.text(host)
        w.text(tracker)
        w.u32(graceMilliseconds)
        w.u64(layoutEpoch)
        w.regions(layout)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> TrackReply {
        var r = WireReader(bytes)
        let session = try r.bytes16("session", limit: 16)
        guard let phase = SessionPhase(rawValue: try r.u8("phase")) else { throw WireDecodeError("unknown session phase") }
        let pid = Int32(bitPattern: try r.u32("pid"))
        let host = try r.text("host")
        let tracker = try r.text("tracker")
        let grace = try r.u32("grace")
        let epoch = try r.u64("layout epoch")
        let layout = try r.regions()
        try r.expectEnd("Track reply")
        return TrackReply(session: session, phase: phase, pid: pid, host: host, tracker: tracker,
                          graceMilliseconds: grace, layoutEpoch: epoch, layout: layout)
    }
}

/// ReadAt: the pages of `ranges`, replied as streamed parts of page runs.
public struct ReadRequest: Sendable, Equatable {
    public var ranges: [AddressRange]
    public init(ranges: [AddressRange]) { self.ranges = ranges }

    public var pageCount: Int { ranges.reduce(0) { $0 + Int($1.pageCount) } }

    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 4 + ranges.count * 12)
        w.ranges(ranges)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> ReadRequest {
        var r = WireReader(bytes)
        let ranges = try r.ranges(maxPages: MigrationLimits.maxPagesPerRead)
        try r.expectEnd("ReadAt request")
        let request = ReadRequest(ranges: ranges)
        guard request.pageCount <= MigrationLimits.maxPagesPerRead else {
            throw WireDecodeError("ReadAt asks for \(request.pageCount) pages, limit \(MigrationLimits.maxPagesPerRead)")
        }
        return request
    }
}

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
        var runs: [(AddressRange, PageRunKind, Int)] = []  // range, kind, offset in data
        var dataOffset = 0
        for range in ranges {
            var page = range.start
            while page < range.end {
                let offset = dataOffset + Int(page - range.start)
                let kind: PageRunKind
                if holes.contains(where: { $0.contains(page) }) {
                    kind = .hole
                } else if unmapped.contains(where: { $0.contains(page) }) {
                    kind = .unmapped
                } else if isZeroPage(UnsafeRawBufferPointer(rebasing: data[offset..<offset + Int(pageSize)])) {
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

/// True when the page holds only zero bytes. Reads 8 bytes at a time.
func isZeroPage(_ page: UnsafeRawBufferPointer) -> Bool {
    var accumulator: UInt64 = 0
    var offset = 0
    let words = page.count / 8
    // SAFETY: pages come from 4096-aligned buffers; loadUnaligned keeps this
    // correct for any other caller too.
    while offset + 8 <= words {
        for k in 0..<8 { accumulator |= page.loadUnaligned(fromByteOffset: (offset + k) * 8, as: UInt64.self) }
        if accumulator != 0 { return false }
        offset += 8
    }
    return accumulator == 0
}

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

/// Sync and Finalize replies are streamed: a head part with the fixed fields
/// and the layout, then parts of at most `maxRangesPerMessage` dirty ranges.
/// The streamed dirty report of Sync and Finalize (Protocols/migration.md 3.3).
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

/// Checksum: BLAKE2b-256 of each requested range of the frozen source,
/// signed by a seeder that has a key pair (SeederSignature.swift).
public struct ChecksumReply: Sendable, Equatable {
    public var digests: [[UInt8]]
    public var signature: ChecksumSignature? = nil

    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 4 + digests.count * 34 + 128)
        w.u32(UInt32(digests.count))
        for d in digests { w.bytes16(d) }
        if let signature {
            w.u8(1)
            signature.encode(into: &w)
        } else {
            w.u8(0)
        }
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> ChecksumReply {
        var r = WireReader(bytes)
        let count = Int(try r.u32("digest count"))
        guard count <= MigrationLimits.maxRegions, count * 34 <= r.remaining else {
            throw WireDecodeError("\(count) digests announced")
        }
        var digests: [[UInt8]] = []
        for _ in 0..<count { digests.append(try r.bytes16("digest", limit: 64)) }
        let signature: ChecksumSignature?
        switch try r.u8("signature flag") {
        case 0: signature = nil
        case 1: signature = try ChecksumSignature.decode(&r)
        case let other: throw WireDecodeError("unknown checksum signature flag \(other)")
        }
        try r.expectEnd("Checksum reply")
        return ChecksumReply(digests: digests, signature: signature)
    }
}

/// Complete / Abort replies: what the seeder did to the process, as text.
public struct OutcomeReply: Sendable, Equatable {
    public var message: String
    public init(message: String) { self.message = message }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.text(message)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> OutcomeReply {
        var r = WireReader(bytes)
        let message = try r.text("outcome")
        try r.expectEnd("outcome reply")
        return OutcomeReply(message: message)
    }
}
