// How the puller cuts its work into ReadAt requests (background batches in
// the heuristic's order, huge pages whole, hot pages left for the end; the
// requests for a touched page; the batch size that suits the link) and how
// it takes in their replies.
import FerryToolkit

extension Puller {
    /// The next ReadAt batch: pages of the queue that are still wanted, up to the request size.
    /// In pre-copy, hot dirty pages are skipped: they wait for the final dirty set.
    func nextBatch(_ queue: inout [AddressRange], _ cursor: inout Int, limit pagesLimit: Int? = nil,
                   precopy: Bool) -> [AddressRange]? {
        let maxHeat = options.policy.hotAfter
        var batch: [AddressRange] = []
        var pages = 0
        var limit = min(pagesLimit ?? options.pagesPerRequest ?? measured.sizer.pages, MigrationLimits.maxPagesPerRead)
        var hugeIndex = 0
        while cursor < queue.count && pages < limit {
            let range = queue[cursor]
            var page = range.start
            var taken = range.end
            while page < range.end && pages < limit {
                // A huge page starting here goes whole into one request (the
                // seeder re-protects only huge pages read whole): into this
                // one when it fits or the request is empty, else the next.
                if !hugePages.isEmpty, let huge = Self.hugePage(at: page, in: hugePages, from: &hugeIndex),
                   huge.start == page, huge.end <= range.end {
                    let unit = Int(huge.length / pageSize)
                    if pages > 0 && pages + unit > limit {
                        queue[cursor].start = page
                        return batch
                    }
                    limit = max(limit, pages + unit)
                }
                if let state = store.state(at: page), Self.wanted.contains(state),
                   !(precopy && state == .dirty && store.dirtyReportCount(at: page) > maxHeat) {
                    // Not Ranges.append: the queue's ranges need not be in address order.
                    if let last = batch.last, last.end == page {
                        batch[batch.count - 1].end = page + pageSize
                    } else {
                        batch.append(AddressRange(start: page, end: page + pageSize))
                    }
                    pages += 1
                }
                page += pageSize
                taken = page
            }
            if taken >= range.end {
                cursor += 1
            } else {
                queue[cursor].start = taken
            }
        }
        return batch.isEmpty ? nil : batch
    }

    /// The ReadAt requests for a page touched in live memory (reported at
    /// the start of its page, a huge page's in hugetlb regions): the pages
    /// of it not held clean, in requests of at most `maxPagesPerRead` pages.
    /// None for an address outside the layout.
    func touchRequests(_ page: UInt64) -> [[AddressRange]] {
        // The wake-up of a resumed fill (LiveMemorySink.pauseBackgroundFill)
        // names the last page of the address space, in no region: a page
        // range there would overflow.
        guard page <= UInt64.max - pageSize else { return [] }
        var index = 0
        let unit = hugetlbRegions.isEmpty ? nil : Self.hugePage(at: page, in: hugetlbRegions, from: &index)
        let range = unit ?? AddressRange(start: page, end: page + pageSize)
        var requests: [[AddressRange]] = []
        var batch: [AddressRange] = []
        var pages = 0
        var address = range.start
        while address < range.end {
            if let state = store.state(at: address), state != .clean {
                if pages == MigrationLimits.maxPagesPerRead {
                    requests.append(batch)
                    batch = []
                    pages = 0
                }
                Ranges.append(AddressRange(start: address, end: address + pageSize), to: &batch)
                pages += 1
            }
            address += pageSize
        }
        if !batch.isEmpty { requests.append(batch) }
        return requests
    }

    /// Stores a ReadAt reply. Returns true when pages turned out unmapped (the layout moved).
    func receive(_ batch: [AddressRange], _ parts: [[UInt8]]) throws -> Bool {
        var layoutMoved = false
        var arrived: [AddressRange] = []
        let before = bytesReceived
        // Runs are checked against the request by binary search: a batch of
        // scattered dirty pages holds up to 1024 ranges.
        let asked = batch.sorted { $0.start < $1.start }
        func wasAsked(_ run: AddressRange) -> Bool {
            guard let index = Ranges.index(in: asked, containing: run.start, range: { $0 }) else { return false }
            return run.end <= asked[index].end
        }
        for part in parts where !part.isEmpty {
            let runs: [PageRun]
            do {
                runs = try PagePart.parse(part)
            } catch {
                throw MigrationError.protocolViolation("the seeder sent a malformed page batch: \(error)")
            }
            for run in runs {
                guard wasAsked(run.range) else {
                    throw MigrationError.protocolViolation("the seeder sent pages \(run.range) that were not asked for")
                }
                switch run.kind {
                case .data:
                    try destination.store(run.range, from: part, at: run.dataOffset)
                    bytesReceived += run.range.length
                    arrived.append(run.range)
                case .zero:
                    try destination.storeZero(run.range)
                    arrived.append(run.range)
                case .hole:
                    try destination.storeHole(run.range)
                    arrived.append(run.range)
                case .unmapped:
                    layoutMoved = true
                    try countUnmapped(run.range)
                }
            }
        }
        store.markArrived(arrived)
        // Whatever was asked and not answered (unmapped pages) is asked again
        // once the layout says whether it still exists.
        store.markLost(batch)
        measured.rate.add(bytesReceived - before)
        // The first replies land in a burst: a rate over a few milliseconds
        // says nothing of the link (it once read 45 ms for 1 GiB and froze
        // the source with every page still remote).
        if measured.rate.span >= LinkMeasurements.trustedSpan {
            measured.linkRate = max(measured.linkRate, measured.rate.perSecond)
        }
        return layoutMoved
    }

    private func countUnmapped(_ range: AddressRange) throws {
        // A page the layout no longer covers is forgotten at the next Sync; one
        // it still covers is asked again, and should come back once the
        // seeder's layout has caught up.
        guard store.state(at: range.start) != nil else { return }
        let answers = unmappedAnswers[range.start, default: 0] + 1
        unmappedAnswers[range.start] = answers
        if answers >= Self.maxUnmappedAnswers {
            throw MigrationError.seeder(
                "the seeder cannot supply page 0x\(String(range.start, radix: 16)): it answered 'unmapped' \(answers) times while the layout still holds it; the migration is aborted and the source thawed")
        }
    }

    /// The huge page of `regions` (sorted hugetlb regions) containing
    /// `address`, if any; `index` remembers where the last lookup ended.
    static func hugePage(at address: UInt64, in regions: [Region], from index: inout Int) -> AddressRange? {
        if index >= regions.count || regions[index].start > address { index = 0 }
        while index < regions.count && regions[index].end <= address { index += 1 }
        guard index < regions.count, regions[index].range.contains(address) else { return nil }
        let size = regions[index].pageSize
        let start = address & ~(size - 1)
        return AddressRange(start: start, end: start + size)
    }

}

/// Sizes ReadAt requests to the link by climbing towards the best measured
/// throughput: each window of replies is timed, and the size keeps moving
/// (doubling or halving) while throughput improves, and turns back when it
/// drops. Latency alone cannot guide it: with many requests in flight a
/// reply's latency is mostly queueing behind the others.
struct BatchSizer {
    private(set) var pages = 256
    static let smallest = 32
    /// Replies per measurement window.
    static let window = 24
    /// And at least this long: over a 20 ms round trip replies land in
    /// bursts, and shorter windows measured the bursts, not the link (the
    /// size then wandered down to 32 pages and the pull to 130 MB/s).
    static let minimumWindow: Duration = .milliseconds(200)
    /// A change of throughput smaller than this share is noise.
    static let significant = 0.10

    private var growing = true
    private var bytes = 0
    private var replies = 0
    private var windowStart: ContinuousClock.Instant? = nil
    private var lastRate: Double = 0

    mutating func observe(pages asked: Int, took: Duration, now: ContinuousClock.Instant = .now) {
        if windowStart == nil { windowStart = now - took }
        bytes += asked * Int(pageSize)
        replies += 1
        guard replies >= Self.window, let start = windowStart, now - start >= Self.minimumWindow else { return }
        let rate = Double(bytes) / (now - start).inSeconds
        let worse = lastRate > 0 && rate < lastRate * (1 - Self.significant)
        let better = rate > lastRate * (1 + Self.significant)
        if worse { growing.toggle() }
        if worse || better {
            var next = growing ? pages * 2 : pages / 2
            if next > MigrationLimits.maxPagesPerRead {
                // Still growing at the largest size: stay there. (Bouncing
                // back halved the bytes in flight; over a 20 ms round trip
                // that halved the throughput.) A worse window turns it down.
                next = pages
            } else if next < Self.smallest {
                // At the smallest, bounce back up.
                next = pages * 2
                growing = true
            }
            pages = next
        }
        lastRate = rate
        bytes = 0
        replies = 0
        windowStart = now
    }
}

