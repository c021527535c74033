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
//
// Hugetlb regions (2 MiB or 1 GiB pages) are protected, unprotected and
// scanned by the kernel only in whole pages of their size: UFFDIO_WRITEPROTECT
// refuses (EINVAL) any request that touches a hugetlb mapping unless the
// request's start and length are multiples of that size, even when most of
// it lies in ordinary memory next to it. So trackers cut every request at
// hugetlb boundaries (`HugePageMap.split`), a write reports the whole huge
// page dirty, and owners pass `rearm` only whole huge pages (a partly copied
// huge page keeps its dirty state: see TrackedProcess.rearm).
import FerryToolkit

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
    /// Registers `range` (within one mapping whose pages are `pageSize`
    /// bytes; `range` is aligned to them) and write-protects it. Throws
    /// when the kernel refuses the mapping; the caller then lists it as unprotectable.
    func track(_ range: AddressRange, pageSize: UInt64) throws
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
    /// Tracks ordinary (4 KiB page) memory.
    func track(_ range: AddressRange) throws { try track(range, pageSize: FerrySystem.pageSize) }

    /// Written pages since the last scan or rearm, re-protected: exact per-interval write sets.
    func scan(_ ranges: [AddressRange]) throws -> DirtyScan { try scan(ranges, rearm: true) }
}

/// The hugetlb ranges a tracker watches and their page sizes: everything
/// else has 4 KiB pages. A plain value; each tracker keeps one under its lock.
struct HugePageMap: Sendable {
    /// Disjoint, sorted by start; each range aligned to its size.
    private var entries: [(range: AddressRange, size: UInt64)] = []

    var isEmpty: Bool { entries.isEmpty }

    mutating func add(_ range: AddressRange, size: UInt64) {
        guard size > pageSize else { return }
        remove(range)
        entries.append((range, size))
        entries.sort { $0.range.start < $1.range.start }
    }

    mutating func remove(_ range: AddressRange) {
        guard !entries.isEmpty else { return }
        entries = entries.flatMap { entry in
            Ranges.subtract([entry.range], [range]).map { (range: $0, size: entry.size) }
        }
    }

    /// The page size at `address`.
    func size(at address: UInt64) -> UInt64 {
        for entry in entries where entry.range.contains(address) { return entry.size }
        return pageSize
    }

    /// The page containing `address`, in the size of the memory there.
    func page(at address: UInt64) -> AddressRange {
        let size = size(at: address)
        let start = address & ~(size - 1)
        return AddressRange(start: start, end: start + size)
    }

    /// `ranges` cut at the edges of hugetlb ranges, so no piece mixes page
    /// sizes; hugetlb pieces rounded outwards to whole huge pages (callers
    /// that must not widen a request align it inwards first).
    func split(_ ranges: [AddressRange]) -> [AddressRange] {
        guard !entries.isEmpty else { return ranges }
        var result: [AddressRange] = []
        for range in ranges {
            var cursor = range.start
            for entry in entries where entry.range.end > cursor && entry.range.start < range.end {
                if entry.range.start > cursor { result.append(AddressRange(start: cursor, end: entry.range.start)) }
                let inside = AddressRange(start: max(cursor, entry.range.start), end: min(range.end, entry.range.end))
                result.append(inside.aligned(outwardTo: entry.size))
                cursor = inside.end
            }
            if cursor < range.end { result.append(AddressRange(start: cursor, end: range.end)) }
        }
        return result
    }

    /// `range` split into the pages of the memory it covers, for page-by-page fallbacks.
    func pages(of range: AddressRange) -> [AddressRange] {
        var result: [AddressRange] = []
        var address = range.start
        while address < range.end {
            let page = page(at: address)
            result.append(page)
            address = page.end
        }
        return result
    }
}
