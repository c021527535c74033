// The leecher's knowledge of every page of the source: whether it is held
// locally and clean, held but written since, in flight, or still remote.
// Data lives in a `PageSink`; this type only keeps states, so it stays small
// (one byte a page) and survives layout changes by reconciling address
// coverage rather than region identity (mprotect splits and merges VMAs).

/// Where one page of the source stands at the leecher.
public enum PageState: UInt8, Sendable, CaseIterable {
    /// Never pulled, or invalidated by a layout change or post-copy marking.
    case remote
    /// Requested; the reply has not arrived.
    case inFlight
    /// Requested, and reported dirty before the reply arrived: the reply may
    /// predate the write, so it is stored but counted dirty.
    case inFlightStale
    /// Held, and not reported written since it was read.
    case clean
    /// Held, but the seeder has reported it written since it was read.
    case dirty
}

/// One contiguous migratable range with a state per page.
struct StoreSegment {
    var range: AddressRange
    var states: [PageState]
    /// How often each page has been reported dirty; the cold-first heuristic orders by it.
    var dirtyReports: [UInt16]

    init(range: AddressRange) {
        self.range = range
        let count = Int(range.pageCount)
        states = Array(repeating: .remote, count: count)
        dirtyReports = Array(repeating: 0, count: count)
    }
}

/// Page states of every migratable region, kept by address.
public struct PageStore: Sendable {
    private(set) var segments: [StoreSegment] = []
    /// Number of pages in each state, kept in step with every change.
    public private(set) var counts: [PageState: Int] = [:]

    public init(layout: [Region]) {
        reconcile(layout: layout)
    }

    public var totalPages: Int { segments.reduce(0) { $0 + $1.states.count } }
    public func count(_ state: PageState) -> Int { counts[state, default: 0] }

    /// Share of pages held and clean, 0...1.
    public var cleanShare: Double {
        let total = totalPages
        return total == 0 ? 1 : Double(count(.clean)) / Double(total)
    }

    /// Pages that still need a pull: remote or dirty (not in flight).
    public var pagesToPull: Int { count(.remote) + count(.dirty) }

    /// Adopts a new layout. Pages whose address stays covered by a migratable
    /// region keep their state; new and grown parts start remote; pages no
    /// longer covered are forgotten.
    public mutating func reconcile(layout: [Region]) {
        let old = segments
        var fresh: [StoreSegment] = []
        for region in layout where region.kind == .migrate && region.range.length > 0 {
            var segment = StoreSegment(range: region.range)
            for previous in old where previous.range.start < region.end && region.start < previous.range.end {
                let from = max(previous.range.start, region.start)
                let to = min(previous.range.end, region.end)
                let src = Int((from - previous.range.start) / pageSize)
                let dst = Int((from - region.start) / pageSize)
                let n = Int((to - from) / pageSize)
                segment.states.replaceSubrange(dst..<dst + n, with: previous.states[src..<src + n])
                segment.dirtyReports.replaceSubrange(dst..<dst + n, with: previous.dirtyReports[src..<src + n])
            }
            fresh.append(segment)
        }
        fresh.sort { $0.range.start < $1.range.start }
        segments = fresh
        recount()
    }

    private mutating func recount() {
        var tally: [PageState: Int] = [:]
        for segment in segments {
            for state in segment.states { tally[state, default: 0] += 1 }
        }
        counts = tally
    }

    /// The state of the page holding `address`, or nil when no region covers it.
    public func state(at address: UInt64) -> PageState? {
        guard let (s, i) = locate(address) else { return nil }
        return segments[s].states[i]
    }

    /// The migratable ranges, in address order.
    public var layout: [AddressRange] { segments.map(\.range) }

    private func locate(_ address: UInt64) -> (Int, Int)? {
        var low = 0, high = segments.count
        while low < high {
            let mid = (low + high) / 2
            if segments[mid].range.end <= address { low = mid + 1 } else { high = mid }
        }
        guard low < segments.count, segments[low].range.contains(address) else { return nil }
        return (low, Int((address - segments[low].range.start) / pageSize))
    }

    /// Applies `transition` to every covered page of `ranges`; uncovered pages are ignored
    /// (the region went away; its pages no longer matter).
    /// Applies `transition` to every page of `ranges`; returns how many changed state.
    @discardableResult
    private mutating func update(_ ranges: [AddressRange], _ transition: (PageState) -> PageState?) -> Int {
        var changed = 0
        for range in ranges {
            var address = range.start
            while address < range.end {
                guard let (s, first) = locateOrNext(address, limit: range.end) else { break }
                let segment = segments[s]
                let start = max(address, segment.range.start)
                let stop = min(range.end, segment.range.end)
                let begin = first
                let end = begin + Int((stop - start) / pageSize)
                for i in begin..<end {
                    let old = segments[s].states[i]
                    if let new = transition(old), new != old {
                        segments[s].states[i] = new
                        counts[old, default: 0] -= 1
                        counts[new, default: 0] += 1
                        changed += 1
                    }
                }
                address = stop
            }
        }
        return changed
    }

    /// The segment covering `address`, or the first one starting before `limit`.
    private func locateOrNext(_ address: UInt64, limit: UInt64) -> (Int, Int)? {
        var low = 0, high = segments.count
        while low < high {
            let mid = (low + high) / 2
            if segments[mid].range.end <= address { low = mid + 1 } else { high = mid }
        }
        guard low < segments.count, segments[low].range.start < limit else { return nil }
        let start = max(address, segments[low].range.start)
        return (low, Int((start - segments[low].range.start) / pageSize))
    }

    /// Pages about to be requested.
    public mutating func markRequested(_ ranges: [AddressRange]) {
        update(ranges) { $0 == .remote || $0 == .dirty ? .inFlight : nil }
    }

    /// Pages whose request failed or was lost: they must be asked again.
    public mutating func markLost(_ ranges: [AddressRange]) {
        update(ranges) { $0 == .inFlight || $0 == .inFlightStale ? .remote : nil }
    }

    /// A reply arrived for these pages. Returns nothing; stale replies count dirty.
    public mutating func markArrived(_ ranges: [AddressRange]) {
        update(ranges) { state in
            switch state {
            case .inFlight: return .clean
            case .inFlightStale: return .dirty
            default: return nil
            }
        }
    }

    /// Seeder side: these pages were just read and sent, so they are clean
    /// until a scan finds them written again.
    public mutating func markSent(_ ranges: [AddressRange]) {
        update(ranges) { _ in .clean }
    }

    /// The seeder reported these pages written since they were sent.
    /// Returns how many held copies this made stale (clean or in flight before).
    @discardableResult
    public mutating func markDirty(_ ranges: [AddressRange]) -> Int {
        for range in ranges {
            forEachPage(in: range) { s, i in segments[s].dirtyReports[i] &+= 1 }
        }
        return update(ranges) { state in
            switch state {
            case .clean: return .dirty
            case .inFlight: return .inFlightStale
            default: return nil
            }
        }
    }

    /// After Finalize: pages that are not held clean become remote, to be
    /// filled by post-copy.
    public mutating func markRemoteUnlessClean() {
        for s in segments.indices {
            for i in segments[s].states.indices where segments[s].states[i] != .clean {
                segments[s].states[i] = .remote
            }
        }
        recount()
    }

    private func forEachPage(in range: AddressRange, _ body: (Int, Int) -> Void) {
        var address = range.start
        while address < range.end, let (s, first) = locateOrNext(address, limit: range.end) {
            let stop = min(range.end, segments[s].range.end)
            let start = max(address, segments[s].range.start)
            for i in first..<(first + Int((stop - start) / pageSize)) { body(s, i) }
            address = stop
        }
    }

    /// Ranges of pages in `states`, in address order, coalesced, each at most
    /// `maxPages` long.
    public func ranges(in states: Set<PageState>, maxPages: Int = .max) -> [AddressRange] {
        var out: [AddressRange] = []
        for segment in segments {
            var runStart: Int? = nil
            func flush(_ end: Int) {
                guard let start = runStart else { return }
                var from = start
                while from < end {
                    let to = end - from <= maxPages ? end : from + maxPages
                    out.append(AddressRange(start: segment.range.start + UInt64(from) * pageSize,
                                            end: segment.range.start + UInt64(to) * pageSize))
                    from = to
                }
                runStart = nil
            }
            for (i, state) in segment.states.enumerated() {
                if states.contains(state) {
                    if runStart == nil { runStart = i }
                } else {
                    flush(i)
                }
            }
            flush(segment.states.count)
        }
        return out
    }

    /// How often the page at `address` was reported dirty.
    public func dirtyReportCount(at address: UInt64) -> Int {
        guard let (s, i) = locate(address) else { return 0 }
        return Int(segments[s].dirtyReports[i])
    }
}
