// Address-range arithmetic on sorted, merged lists: the one place ranges are
// coalesced, intersected, subtracted and searched. Dirty sets, layouts, page
// runs and requests all go through it. The searches are @inlinable: they run
// once per page marked, and a generic call across modules is not specialised
// (it cost the seeder's Finalize 10 ms at 85k dirty pages).
import FerryToolkit

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

    /// Appends `range` to `result` (sorted, merged), extending the last range
    /// when the two touch or overlap: the one way runs are built up in order.
    @inlinable
    public static func append(_ range: AddressRange, to result: inout [AddressRange]) {
        guard range.length > 0 else { return }
        if let last = result.last, range.start <= last.end {
            result[result.count - 1].end = max(last.end, range.end)
        } else {
            result.append(range)
        }
    }

    /// The index of the first element of `sorted` (ascending, not
    /// overlapping) whose end lies after `address`: where a search for
    /// `address` starts. `end` reads an element's end address, so arrays of
    /// regions, runs or ranges are searched alike. Binary search.
    @inlinable
    public static func firstIndex<C: RandomAccessCollection>(
        in sorted: C, endingAfter address: UInt64, end: (C.Element) -> UInt64
    ) -> C.Index {
        var low = sorted.startIndex, high = sorted.endIndex
        while low < high {
            let mid = sorted.index(low, offsetBy: sorted.distance(from: low, to: high) / 2)
            if end(sorted[mid]) <= address { low = sorted.index(after: mid) } else { high = mid }
        }
        return low
    }

    /// The index of the element of `sorted` that holds `address`, if any.
    @inlinable
    public static func index<C: RandomAccessCollection>(
        in sorted: C, containing address: UInt64, range: (C.Element) -> AddressRange
    ) -> C.Index? {
        let found = firstIndex(in: sorted, endingAfter: address) { range($0).end }
        return found < sorted.endIndex && range(sorted[found]).contains(address) ? found : nil
    }

    /// Whether `address` lies in one of `sorted` (merged, ascending): binary search.
    @inlinable
    public static func contains(_ sorted: [AddressRange], _ address: UInt64) -> Bool {
        index(in: sorted, containing: address) { $0 } != nil
    }

    /// Rounds outwards to page boundaries.
    @inlinable
    public static func pageAligned(_ range: AddressRange) -> AddressRange {
        let start = range.start & ~(pageSize - 1)
        let end = (range.end + pageSize - 1) & ~(pageSize - 1)
        return AddressRange(start: start, end: end)
    }
}
