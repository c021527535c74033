// What one side knows of every page of the source: at the leecher, whether
// it is held locally and clean, held but written since, in flight, or still
// remote; at the seeder, which pages a leecher holds since they were sent
// (`markSent`). Data lives elsewhere (the leecher's `Destination`); this type
// only keeps states, so it stays small (one byte a page, and a stale count)
// and survives layout changes by reconciling address coverage rather than
// region identity (mprotect splits and merges VMAs).

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
    /// How often each page's held copy went stale (clean -> dirty, or in
    /// flight -> stale): the cold-first heuristic orders by it, and pre-copy
    /// leaves hot pages to the final dirty set.
    var dirtyReports: [UInt16]

    init(range: AddressRange) {
        self.range = range
        let count = Int(range.pageCount)
        states = Array(repeating: .remote, count: count)
        dirtyReports = Array(repeating: 0, count: count)
    }
}

/// Page states of every migratable region, kept by address.
///
/// Every mark costs O(pages marked) plus one binary search per range: the
/// per-page arrays are changed in place. (A copy of a segment held while
/// writing to it turned each range into a copy-on-write of the whole
/// segment: 95 % of the CPU of both sides under write load.)
public struct PageStore: Sendable {
    private(set) var segments: [StoreSegment] = []
    /// Number of pages in each state (indexed by raw value), kept in step with every change.
    private var tally = [Int](repeating: 0, count: PageState.allCases.count)
    /// Pages in all segments.
    public private(set) var totalPages = 0

    public init(layout: [Region]) {
        reconcile(layout: layout)
    }

    public func count(_ state: PageState) -> Int { tally[Int(state.rawValue)] }

    /// Share of pages held and clean, 0...1.
    public var cleanShare: Double {
        totalPages == 0 ? 1 : Double(count(.clean)) / Double(totalPages)
    }

    /// Pages that still need a pull: remote or dirty (not in flight).
    public var pagesToPull: Int { count(.remote) + count(.dirty) }

    /// Adopts a new layout. Pages whose address stays covered by a migratable
    /// region keep their state; new and grown parts start remote; pages no
    /// longer covered are forgotten.
    public mutating func reconcile(layout: [Region]) {
        let old = segments
        var fresh: [StoreSegment] = []
        let wanted = layout.filter { $0.kind == .migrate && $0.range.length > 0 }.sorted { $0.start < $1.start }
        // Both lists are in address order: walk them together.
        var first = 0
        for region in wanted {
            var segment = StoreSegment(range: region.range)
            while first < old.count && old[first].range.end <= region.start { first += 1 }
            var k = first
            while k < old.count && old[k].range.start < region.end {
                let previous = old[k]
                let from = max(previous.range.start, region.start)
                let to = min(previous.range.end, region.end)
                let src = Int((from - previous.range.start) / pageSize)
                let dst = Int((from - region.start) / pageSize)
                let n = Int((to - from) / pageSize)
                segment.states.replaceSubrange(dst..<dst + n, with: previous.states[src..<src + n])
                segment.dirtyReports.replaceSubrange(dst..<dst + n, with: previous.dirtyReports[src..<src + n])
                k += 1
            }
            fresh.append(segment)
        }
        segments = fresh
        recount()
    }

    private mutating func recount() {
        var counted = [Int](repeating: 0, count: PageState.allCases.count)
        var total = 0
        for segment in segments {
            for state in segment.states { counted[Int(state.rawValue)] += 1 }
            total += segment.states.count
        }
        tally = counted
        totalPages = total
    }

    /// The state of the page holding `address`, or nil when no region covers it.
    public func state(at address: UInt64) -> PageState? {
        guard let (s, i) = locate(address) else { return nil }
        return segments[s].states[i]
    }

    /// The migratable ranges, in address order.
    public var layout: [AddressRange] { segments.map(\.range) }

    private func locate(_ address: UInt64) -> (Int, Int)? {
        let s = firstSegment(endingAfter: address)
        guard s < segments.count, segments[s].range.contains(address) else { return nil }
        return (s, Int((address - segments[s].range.start) / pageSize))
    }

    /// Index of the first segment whose end is above `address` (binary search).
    private func firstSegment(endingAfter address: UInt64) -> Int {
        Ranges.firstIndex(in: segments, endingAfter: address) { $0.range.end }
    }

    /// Applies `transition` to every covered page of `ranges`, in place;
    /// returns how many changed state. Uncovered pages are skipped (their
    /// region went away; they no longer matter). One binary search per
    /// range. With `countStale`, a page whose held copy turns stale gets one
    /// more dirty report.
    @discardableResult
    @inline(__always)
    private mutating func update(_ ranges: [AddressRange], countStale: Bool = false,
                                 _ transition: (PageState) -> PageState?) -> Int {
        var changed = 0
        var counted = tally
        // The arrays are taken out of their segment while they change, so the
        // segment holds no second reference that would force a copy.
        var states: [PageState] = []
        var reports: [UInt16] = []
        var current = -1
        for range in ranges where range.end > range.start {
            var k = firstSegment(endingAfter: range.start)
            while k < segments.count && segments[k].range.start < range.end {
                let segment = segments[k].range
                if k != current {
                    if current >= 0 {
                        swap(&states, &segments[current].states)
                        swap(&reports, &segments[current].dirtyReports)
                    }
                    current = k
                    swap(&states, &segments[k].states)
                    swap(&reports, &segments[k].dirtyReports)
                }
                let first = Int((max(range.start, segment.start) - segment.start) / pageSize)
                let last = Int((min(range.end, segment.end) - segment.start) / pageSize)
                for i in first..<last {
                    let old = states[i]
                    guard let new = transition(old), new != old else { continue }
                    states[i] = new
                    counted[Int(old.rawValue)] -= 1
                    counted[Int(new.rawValue)] += 1
                    changed += 1
                    if countStale && (new == .dirty || new == .inFlightStale) { reports[i] &+= 1 }
                }
                k += 1
            }
        }
        if current >= 0 {
            swap(&states, &segments[current].states)
            swap(&reports, &segments[current].dirtyReports)
        }
        tally = counted
        return changed
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
    /// Returns how many held copies this made stale (clean or in flight
    /// before); only those count towards a page's heat, so a page reported
    /// again while it is still dirty does not look hotter.
    @discardableResult
    public mutating func markDirty(_ ranges: [AddressRange]) -> Int {
        update(ranges, countStale: true) { state in
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
            for i in segments[s].states.indices where segments[s].states[i] != .clean { segments[s].states[i] = .remote }
        }
        recount()
    }

    /// Ranges of pages in `states`, in address order, coalesced, each at most
    /// `maxPages` long. With `maxHeat`, dirty pages whose copies went stale
    /// more than `maxHeat` times are left out (hot pages wait for the end).
    public func ranges(in states: Set<PageState>, maxPages: Int = .max, maxHeat: Int? = nil) -> [AddressRange] {
        var want = [Bool](repeating: false, count: PageState.allCases.count)
        for state in states { want[Int(state.rawValue)] = true }
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
            segment.states.withUnsafeBufferPointer { pageStates in
                for i in pageStates.indices {
                    let state = pageStates[i]
                    var taken = want[Int(state.rawValue)]
                    if taken, let maxHeat, state == .dirty, Int(segment.dirtyReports[i]) > maxHeat { taken = false }
                    if taken {
                        if runStart == nil { runStart = i }
                    } else {
                        flush(i)
                    }
                }
            }
            flush(segment.states.count)
        }
        return out
    }

    /// Dirty pages whose copies went stale more than `maxHeat` times.
    public func hotPages(maxHeat: Int) -> Int {
        var hot = 0
        for segment in segments {
            for i in segment.states.indices where segment.states[i] == .dirty && Int(segment.dirtyReports[i]) > maxHeat {
                hot += 1
            }
        }
        return hot
    }

    /// How often the copy of the page at `address` went stale.
    public func dirtyReportCount(at address: UInt64) -> Int {
        guard let (s, i) = locate(address) else { return 0 }
        return Int(segments[s].dirtyReports[i])
    }
}
