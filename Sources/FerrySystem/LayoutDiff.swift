// Compares two readings of a process's memory map.
//
// Why: pages in regions created or grown after Track() were never
// write-protected, so the tracker cannot vouch for them; they are dirty in
// full. Regions that vanished must not be read again.
//
// Lines of /proc/PID/maps are not identities: mprotect splits one VMA into
// several, adjacent anonymous VMAs with equal flags merge, and a region can be
// unmapped and a new one mapped at the same address. So the diff works on
// address coverage of the *migrate* regions, each address tagged with what
// backs it (anonymous private, anonymous shared, or device + inode + the file
// offset that maps to address 0). An address is unchanged when old and new
// both cover it with the same backing; splits, merges and protection changes
// between readable states therefore produce no change, while a file or memfd
// replaced at the same address does.
//
// Known limit: an anonymous private mapping unmapped and mapped again at the
// same address between two readings has the same backing tag and is not seen
// here; the trackers must notice the lost write-protection themselves.
import FerryToolkit

/// What changed in the migrate regions between two readings of the maps.
public struct LayoutChange: Sendable, Equatable {
    /// The new layout, all kinds.
    public var regions: [Region]
    /// New migrate regions that overlap nothing migrated before.
    public var added: [Region]
    /// Old migrate regions that no longer overlap anything migrated.
    public var removed: [Region]
    /// New migrate regions that overlap old coverage and also cover new addresses.
    public var grown: [Region]
    /// Old migrate regions that overlap new coverage but lost some addresses.
    public var shrunk: [Region]
    /// Addresses that need copying in full: new regions and grown parts, merged.
    public var newlyDirty: [AddressRange]
    /// Addresses migrated before and not any more (unmapped, made
    /// inaccessible, or now backed by something else), merged.
    public var unmapped: [AddressRange]

    public init(regions: [Region], added: [Region] = [], removed: [Region] = [], grown: [Region] = [],
                shrunk: [Region] = [], newlyDirty: [AddressRange] = [], unmapped: [AddressRange] = []) {
        self.regions = regions
        self.added = added
        self.removed = removed
        self.grown = grown
        self.shrunk = shrunk
        self.newlyDirty = newlyDirty
        self.unmapped = unmapped
    }

    /// True when no migrate address was added or lost.
    public var isEmpty: Bool { newlyDirty.isEmpty && unmapped.isEmpty }

    public var newlyDirtyPages: UInt64 { newlyDirty.reduce(0) { $0 + $1.pageCount } }
}

extension LayoutChange {
    /// Compares the migrate regions of `old` and `new` by address coverage.
    public static func diff(old: [Region], new: [Region]) -> LayoutChange {
        let oldSegments = segments(of: old)
        let newSegments = segments(of: new)
        let appeared = subtract(newSegments, oldSegments)
        let vanished = subtract(oldSegments, newSegments)

        var change = LayoutChange(regions: new)
        change.newlyDirty = merge(appeared)
        change.unmapped = merge(vanished)

        for region in new where region.kind == .migrate {
            let fresh = overlapLength(region.range, change.newlyDirty)
            if fresh == 0 { continue }
            if fresh == region.range.length { change.added.append(region) } else { change.grown.append(region) }
        }
        for region in old where region.kind == .migrate {
            let lost = overlapLength(region.range, change.unmapped)
            if lost == 0 { continue }
            if lost == region.range.length { change.removed.append(region) } else { change.shrunk.append(region) }
        }
        return change
    }

    /// What backs an address: equal tags mean "the same memory".
    private struct Backing: Equatable {
        var shared: Bool
        var device: String
        var inode: UInt64
        /// File offset minus address, so that the pieces of one split
        /// file mapping all carry the same value.
        var offsetBase: UInt64
    }

    private struct Segment {
        var start: UInt64
        var end: UInt64
        var backing: Backing
    }

    private static func segments(of regions: [Region]) -> [Segment] {
        var result: [Segment] = []
        result.reserveCapacity(regions.count)
        for region in regions where region.kind == .migrate && region.range.length > 0 {
            let backing: Backing
            if region.inode == 0 {
                // Private anonymous memory: offsets in maps are page offsets
                // that change on mremap; anonymous memory has one identity.
                backing = Backing(shared: region.isShared, device: "", inode: 0, offsetBase: 0)
            } else {
                backing = Backing(shared: region.isShared, device: region.device, inode: region.inode,
                                  offsetBase: region.offset &- region.start)
            }
            result.append(Segment(start: region.start, end: region.end, backing: backing))
        }
        result.sort { $0.start < $1.start }
        return result
    }

    /// Parts of `a` not covered by a segment of `b` with the same backing.
    /// Both inputs are sorted by start; segments within one input do not overlap.
    private static func subtract(_ a: [Segment], _ b: [Segment]) -> [AddressRange] {
        var result: [AddressRange] = []
        var j = 0
        for segment in a {
            // Skip b segments that end before this one starts.
            while j < b.count && b[j].end <= segment.start { j += 1 }
            var cursor = segment.start
            var k = j
            while k < b.count && b[k].start < segment.end {
                let other = b[k]
                if other.backing == segment.backing {
                    let coveredStart = max(other.start, segment.start)
                    let coveredEnd = min(other.end, segment.end)
                    if coveredStart > cursor { result.append(AddressRange(start: cursor, end: coveredStart)) }
                    cursor = max(cursor, coveredEnd)
                }
                k += 1
            }
            if cursor < segment.end { result.append(AddressRange(start: cursor, end: segment.end)) }
        }
        return result
    }

    /// Sorts and merges touching or overlapping ranges.
    static func merge(_ ranges: [AddressRange]) -> [AddressRange] {
        guard !ranges.isEmpty else { return [] }
        let sorted = ranges.sorted { $0.start < $1.start }
        var result: [AddressRange] = [sorted[0]]
        for range in sorted.dropFirst() {
            if range.start <= result[result.count - 1].end {
                result[result.count - 1].end = max(result[result.count - 1].end, range.end)
            } else {
                result.append(range)
            }
        }
        return result
    }

    private static func overlapLength(_ range: AddressRange, _ sortedRanges: [AddressRange]) -> UInt64 {
        // Binary search for the first range that ends after `range.start`.
        var low = 0, high = sortedRanges.count
        while low < high {
            let mid = (low + high) / 2
            if sortedRanges[mid].end <= range.start { low = mid + 1 } else { high = mid }
        }
        var total: UInt64 = 0
        var i = low
        while i < sortedRanges.count && sortedRanges[i].start < range.end {
            total += min(sortedRanges[i].end, range.end) - max(sortedRanges[i].start, range.start)
            i += 1
        }
        return total
    }
}

extension ProcessMaps {
    /// Same as `LayoutChange.diff(old:new:)`, beside the reader that produces its inputs.
    public static func diff(old: [Region], new: [Region]) -> LayoutChange {
        LayoutChange.diff(old: old, new: new)
    }
}
