// The contract of a write tracker, and the range arithmetic the trackers share.
//
// Why a protocol: three kernel mechanisms can tell which pages of a running
// process were written (see AsyncWPTracker, SyncWPTracker, SoftDirtyTracker);
// they differ in cost and availability, not in what they promise.
//
// The promise: after `track(range)`, every write to a page of `range` makes
// that page appear in the result of a later `scan`, unless `rearm` covered
// the page *after* the write (the caller then copies the page after the
// rearm, so the copy holds the write). Pages that were not written may appear
// (whole 2 MiB transparent huge pages, conservative trackers); written pages
// are never missed.
//
// Two ways to scan. `rearm: true` protects the reported pages again, so the
// next scan reports only writes made after this one: exact write sets per
// interval, paid for with one write fault per page re-dirtied per interval
// (and, for the async tracker, a TLB flush in the process for every page
// re-protected). `rearm: false` leaves the pages writable: they are reported
// again (or, by trackers that cannot tell, at least once) until `rearm`
// covers them. That is all a seeder needs, since a page only has to be
// watched once the destination holds a copy of it, and `rearm` happens
// exactly when a copy is made; the process then pays one fault per page per
// copy sent, however often the seeder scans.

/// Which tracker to use. `nil` in `TrackedProcess.attach` picks the best available.
public enum TrackerKind: String, CaseIterable, Sendable {
    /// UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN (kernel 6.7+): the kernel resolves
    /// write faults itself, a scan returns written pages and re-protects them atomically.
    case async
    /// Synchronous uffd-WP (5.7+; 6.4+ to catch first writes to untouched pages):
    /// a handler thread records each fault, unprotects the page and wakes the writer.
    case sync
    /// Soft-dirty bits (CONFIG_MEM_SOFT_DIRTY): clear_refs and pagemap bit 55.
    case softDirty = "soft-dirty"
}

/// The result of one scan.
public struct DirtyScan: Sendable, Equatable {
    /// Written pages, merged into ranges, ascending.
    public var dirty: [AddressRange]
    /// Scanned ranges found no longer registered with the tracker (the
    /// mapping was replaced): their contents are unknown, so the owner must
    /// treat them as dirty in full and register them again.
    public var lost: [AddressRange]

    public init(dirty: [AddressRange] = [], lost: [AddressRange] = []) {
        self.dirty = dirty
        self.lost = lost
    }
}

/// A write tracker over the memory of one process. Implementations are safe
/// to call from several threads; `scan` calls are serialized by the owner.
public protocol DirtyTracker: AnyObject, Sendable {
    var kind: TrackerKind { get }
    /// Registers `range` (within one mapping) and write-protects it. Throws
    /// when the kernel refuses the mapping; the caller then lists it as unprotectable.
    func track(_ range: AddressRange) throws
    /// Re-protects registered ranges that are about to be copied.
    func rearm(_ ranges: [AddressRange]) throws
    /// Pages of `ranges` written since the last rearm, or since the last
    /// scan that re-protected them; with `rearm`, re-protects them.
    func scan(_ ranges: [AddressRange], rearm: Bool) throws -> DirtyScan
    /// Stops tracking `range`; writes to it are no longer seen.
    func untrack(_ range: AddressRange) throws
    /// Releases the tracker's kernel resources; the process runs on unprotected.
    func close()
}

extension DirtyTracker {
    /// Written pages since the last scan or rearm, re-protected: exact per-interval write sets.
    func scan(_ ranges: [AddressRange]) throws -> DirtyScan { try scan(ranges, rearm: true) }
}

/// Sorted, merged range arithmetic. Inputs need not be sorted unless stated.
public enum Ranges {
    /// Sorts and merges touching or overlapping ranges.
    public static func merge(_ ranges: [AddressRange]) -> [AddressRange] {
        guard !ranges.isEmpty else { return [] }
        // Scan results arrive sorted: check in one pass before paying for a sort.
        var inOrder = true
        for index in ranges.indices.dropFirst() where ranges[index].start < ranges[index - 1].start {
            inOrder = false
            break
        }
        let sorted = inOrder ? ranges : ranges.sorted { $0.start < $1.start }
        var result: [AddressRange] = []
        result.reserveCapacity(sorted.count)
        result.append(sorted[0])
        for range in sorted.dropFirst() where range.length > 0 {
            if range.start <= result[result.count - 1].end {
                result[result.count - 1].end = max(result[result.count - 1].end, range.end)
            } else {
                result.append(range)
            }
        }
        return result.filter { $0.length > 0 }
    }

    /// The parts of `a` that lie inside `b`. Both merged and sorted.
    public static func intersect(_ a: [AddressRange], _ b: [AddressRange]) -> [AddressRange] {
        var result: [AddressRange] = []
        var i = 0, j = 0
        while i < a.count && j < b.count {
            let start = max(a[i].start, b[j].start)
            let end = min(a[i].end, b[j].end)
            if start < end { result.append(AddressRange(start: start, end: end)) }
            if a[i].end < b[j].end { i += 1 } else { j += 1 }
        }
        return result
    }

    /// The parts of `a` outside `b`. Both merged and sorted.
    public static func subtract(_ a: [AddressRange], _ b: [AddressRange]) -> [AddressRange] {
        var result: [AddressRange] = []
        var j = 0
        for range in a {
            var cursor = range.start
            while j < b.count && b[j].end <= cursor { j += 1 }
            var k = j
            while k < b.count && b[k].start < range.end {
                if b[k].start > cursor { result.append(AddressRange(start: cursor, end: b[k].start)) }
                cursor = max(cursor, b[k].end)
                k += 1
            }
            if cursor < range.end { result.append(AddressRange(start: cursor, end: range.end)) }
        }
        return result
    }

    /// Page numbers (address / pageSize), sorted, as merged ranges.
    public static func fromPages<S: Sequence>(_ pages: S) -> [AddressRange] where S.Element == UInt64 {
        let sorted = pages.sorted()
        var result: [AddressRange] = []
        for page in sorted {
            let start = page * pageSize
            if let last = result.last, last.end == start {
                result[result.count - 1].end = start + pageSize
            } else {
                result.append(AddressRange(start: start, end: start + pageSize))
            }
        }
        return result
    }

    /// Whether `address` lies in one of `sorted` (merged, ascending): binary search.
    public static func contains(_ sorted: [AddressRange], _ address: UInt64) -> Bool {
        var low = 0, high = sorted.count
        while low < high {
            let mid = (low + high) / 2
            if sorted[mid].end <= address { low = mid + 1 } else { high = mid }
        }
        return low < sorted.count && sorted[low].contains(address)
    }

    /// Rounds outwards to page boundaries.
    public static func pageAligned(_ range: AddressRange) -> AddressRange {
        let start = range.start & ~(pageSize - 1)
        let end = (range.end + pageSize - 1) & ~(pageSize - 1)
        return AddressRange(start: start, end: end)
    }
}
