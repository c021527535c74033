// The leecher's puller: pre-copy rounds in the heuristic's order with many
// ReadAt requests in flight, the dirty set learned by Sync now and then,
// the finalize decision (FinalizePolicy), the Finalize call itself, and the
// post-copy fill, touched pages first. It owns what the leecher knows of the
// source's pages (`PageStore`) and of the link; the pages themselves go to
// the `Destination`. Requests and their replies are in PullBatches.swift.
import FerryToolkit

/// How post-copy paces its background fill while a consumer uses the pages
/// (live memory): fewer requests and smaller ones than pre-copy.
public struct PostCopyOptions: Sendable {
    /// Background ReadAt requests in flight during post-copy, and pages in
    /// each. Touched pages travel on their own (companion) connection, so
    /// they do not queue behind these replies; what the window still bounds
    /// is the CPU the fill takes from the touch path. On our 2-core loopback
    /// (Tools/bench-postcopy, release, seeder in its own process, same-run
    /// ratios): 1 x 64 pages left the fill at 35-45 % of the link (one
    /// request at a time cannot hide the round trip); 4 x 64 gave touches at
    /// 1.8-2.6x the round trip with the fill at 74-87 %; 2 x 256 touches up
    /// to 3.7x.
    public var requestsInFlight = 4
    public var pagesPerRequest = 64

    public init() {}
}

/// What the puller measured of the link and the source's writes.
struct LinkMeasurements {
    /// Page bytes per second over the last two seconds.
    var rate = RateMeter(window: .seconds(2))
    /// The best throughput measured: the link's capacity, for the policy
    /// (the current rate falls once only a few dirty pages are left to pull).
    var linkRate: Double = 0
    /// The quickest Sync round trip seen, seconds.
    var roundTrip: Double = 0
    /// Pages per second going stale, as the seeder reports.
    var dirtyRate: Double = 0
    var sizer = BatchSizer()

    /// A rate measured over at least this long is taken as the link's.
    static let trustedSpan: Duration = .milliseconds(500)
}

final class Puller {
    let link: SessionLink
    /// How to open another connection: the companion lane for touched pages.
    private let connect: SessionLink.Connector
    let destination: any Destination
    let options: LeecherOptions
    private let events: @Sendable (LeecherEvent) -> Void

    var store = PageStore(layout: [])
    private(set) var layout: [Region] = [] {
        didSet {
            hugePages = MigrationLimits.wholeHugePages(in: layout)
            hugetlbRegions = layout.filter { $0.kind == .migrate && $0.isHugetlb }
        }
    }
    /// Every hugetlb region of `layout`, ascending: a touch in live memory
    /// fetches its whole huge page.
    private(set) var hugetlbRegions: [Region] = []
    /// Hugetlb regions of `layout` whose pages fit one ReadAt, ascending:
    /// requests take their huge pages whole, so the seeder can re-arm them.
    private(set) var hugePages: [Region] = []
    private var layoutEpoch: UInt64 = 0
    var bytesReceived: UInt64 = 0
    var measured = LinkMeasurements()
    /// Hot dirty pages (left for the end), counted when a dirty report lands.
    private var hotPages = 0
    private var started = ContinuousClock.now
    private var lastProgress = ContinuousClock.now
    /// The companion lane, opened at the first touched page; nil until then.
    private(set) var companion: SessionLink? = nil
    /// Pages of the layout answered `unmapped` again and again: a page the
    /// seeder cannot supply must end the migration, never be waited for.
    var unmappedAnswers: [UInt64: Int] = [:]
    static let maxUnmappedAnswers = 50

    init(link: SessionLink, connect: @escaping SessionLink.Connector, destination: any Destination,
         options: LeecherOptions, events: @escaping @Sendable (LeecherEvent) -> Void) {
        self.link = link
        self.connect = connect
        self.destination = destination
        self.options = options
        self.events = events
    }

    /// The first layout, from Track: pulling starts from it.
    func begin(layout first: [Region], epoch: UInt64, started: ContinuousClock.Instant) throws {
        self.started = started
        layout = first
        layoutEpoch = epoch
        store = PageStore(layout: first)
        try destination.check(layout: first)
        destination.adopt(layout: first)
    }

    var elapsed: Double { (ContinuousClock.now - started).inSeconds }

    // MARK: - Pulling

    enum JobResult: Sendable {
        /// A ReadAt reply; `touch`: asked for touched pages, out of the background order.
        case read([AddressRange], [[UInt8]], Duration, touch: Bool = false)
        case sync([[UInt8]], Duration)
        case failed([AddressRange], any Error)
        case syncFailed(any Error)
        /// Pages touched in the destination before they arrived.
        case touched([UInt64])
    }

    static let wanted: Set<PageState> = [.remote, .dirty]

    /// The state of one `pull`: its queue and what is in flight.
    struct Round {
        var queue: [AddressRange]
        var cursor = 0
        var readsInFlight = 0
        var syncInFlight = false
        var lastSync = ContinuousClock.now
        var stopIssuing = false
        var needResync = false
        var convergence = FinalizePolicy.Convergence()
        /// Post-copy into a destination with a consumer: touched pages are fetched first.
        var listening: Bool
        var listenerRunning = false
        var touchesInFlight = 0
        /// Rounds of the heuristic's order begun since a batch was last
        /// issued: a second one in a row means pre-copy has nothing it may
        /// send (hot pages wait), so it waits for the next dirty report.
        var roundsWithoutIssue = 0
    }

    /// Pulls until the finalize policy is met (pre-copy) or every page is held (post-copy).
    func pull(precopy: Bool) async throws {
        var round = Round(queue: options.heuristic.order(store, layout: layout),
                          listening: !precopy && destination.urgentPages != nil)
        try await withThrowingTaskGroup(of: JobResult.self) { group in
            defer { group.cancelAll() }
            while true {
                // Cancelled (SIGINT, SIGTERM): a call ended by cancellation
                // may return what arrived so far rather than throw, so the
                // loop asks itself instead of waiting for a failed job.
                try Task.checkCancellation()
                // Post-copy with a consumer: always one task waiting for touched pages.
                if round.listening && !round.listenerRunning, let urgent = destination.urgentPages {
                    round.listenerRunning = true
                    group.addTask { .touched(await urgent.next()) }
                }
                if precopy && !round.stopIssuing,
                   let reason = options.policy.reason(progressForPolicy(round.convergence.converged)) {
                    events(.finalizing(reason: reason))
                    round.stopIssuing = true
                }
                // Issue reads while there is room (post-copy background fill may be paused: benchmarks).
                let paused = !precopy && destination.backgroundFillPaused
                // Post-copy with a consumer keeps less in flight, and nothing new while a
                // touched page is on its way: its reply queues behind every reply before it
                // on the one connection, so the window bounds first-touch latency.
                let window = round.listening ? min(options.requestsInFlight, options.postCopy.requestsInFlight)
                                             : options.requestsInFlight
                while !round.stopIssuing, !paused, round.touchesInFlight == 0, round.readsInFlight < window {
                    guard let batch = nextBatch(&round.queue, &round.cursor,
                                                limit: round.listening ? options.postCopy.pagesPerRequest : nil,
                                                precopy: precopy) else { break }
                    round.roundsWithoutIssue = 0
                    issueRead(batch, in: &group)
                    round.readsInFlight += 1
                }
                // Ask for the dirty set now and then during pre-copy.
                let now = ContinuousClock.now
                if precopy, !round.stopIssuing, !round.syncInFlight,
                   round.needResync || now - round.lastSync >= options.syncInterval {
                    round.syncInFlight = true
                    round.needResync = false
                    round.lastSync = now
                    issueSync(in: &group)
                }
                if round.readsInFlight == 0 && !round.syncInFlight && !(paused && round.listening) {
                    if round.stopIssuing { return }
                    if store.pagesToPull == 0 || (precopy && round.roundsWithoutIssue > 1) {
                        if !precopy { return }
                        // Everything held, or only hot pages left: wait for the next dirty report.
                        try await Task.sleep(until: round.lastSync + options.syncInterval)
                        round.roundsWithoutIssue = 0
                        continue
                    }
                    // The order is used up but pages are still wanted: a new round.
                    round.queue = options.heuristic.order(store, layout: layout)
                    round.cursor = 0
                    if round.queue.isEmpty { round.queue = store.ranges(in: Self.wanted) }
                    round.roundsWithoutIssue += 1
                    continue
                }
                guard let result = try await group.next() else { continue }
                try await handle(result, in: &round, group: &group)
                reportProgress(precopy ? "pre-copy" : "post-copy")
            }
        }
    }

    private func issueRead(_ batch: [AddressRange], in group: inout ThrowingTaskGroup<JobResult, any Error>) {
        store.markRequested(batch)
        let payload = ReadRequest(ranges: batch).encode()
        let pacer = options.pacer
        let asked = batch.reduce(0) { $0 + Int($1.length) }
        group.addTask { [link] in
            do {
                // The cap: the request waits, the puller loop does not.
                try await pacer?.pace(asked)
                let began = ContinuousClock.now
                let parts = try await link.callParts(.readAt, payload)
                return .read(batch, parts, ContinuousClock.now - began, touch: false)
            } catch {
                return .failed(batch, error)
            }
        }
    }

    private func issueSync(in group: inout ThrowingTaskGroup<JobResult, any Error>) {
        var w = WireWriter()
        w.u64(layoutEpoch)
        let payload = w.bytes
        group.addTask { [link] in
            do {
                let began = ContinuousClock.now
                let parts = try await link.callParts(.sync, payload)
                return .sync(parts, ContinuousClock.now - began)
            } catch {
                return .syncFailed(error)
            }
        }
    }

    /// Touched pages travel on their own connection, so their small replies
    /// do not wait behind the bulk replies of this one. They jump the queue:
    /// one small ReadAt per touched page, even when a background batch holds
    /// it already (that batch may be queued behind others; the page is
    /// installed by whichever reply lands first). A touched huge page comes
    /// whole (what it lacks: live memory stages the pages it holds clean), in
    /// requests of at most the read limit. Returns the requests issued.
    private func issueTouches(_ pages: [UInt64], in group: inout ThrowingTaskGroup<JobResult, any Error>) async -> Int {
        if companion == nil && !pages.isEmpty {
            companion = await link.companionLink(connect: connect)
        }
        let lane = companion ?? link
        var issued = 0
        for page in pages {
            for batch in touchRequests(page) {
                store.markRequested(batch)
                issued += 1
                let payload = ReadRequest(ranges: batch).encode()
                group.addTask { [link] in
                    let began = ContinuousClock.now
                    do {
                        return .read(batch, try await lane.callParts(.readAt, payload), ContinuousClock.now - began,
                                     touch: true)
                    } catch where lane !== link {
                        // A peer without companion connections: the main link still works.
                        do {
                            return .read(batch, try await link.callParts(.readAt, payload), ContinuousClock.now - began,
                                         touch: true)
                        } catch {
                            return .failed(batch, error)
                        }
                    } catch {
                        return .failed(batch, error)
                    }
                }
            }
        }
        return issued
    }

    private func handle(_ result: JobResult, in round: inout Round,
                        group: inout ThrowingTaskGroup<JobResult, any Error>) async throws {
        switch result {
        case .touched(let pages):
            round.listenerRunning = false
            let issued = await issueTouches(pages, in: &group)
            round.readsInFlight += issued
            round.touchesInFlight += issued
            // Empty: the requests were closed (the migration is ending); stop listening.
            if pages.isEmpty { round.listening = false }
        case .read(let batch, let parts, let took, let touch):
            round.readsInFlight -= 1
            if touch {
                round.touchesInFlight -= 1 // a touched page: not a sample for the batch sizer
            } else {
                measured.sizer.observe(pages: batch.reduce(0) { $0 + Int($1.pageCount) }, took: took)
            }
            let before = bytesReceived
            if try receive(batch, parts) { round.needResync = true }
            if let pacer = options.pacer {
                let got = Int(bytesReceived - before)
                if touch { pacer.charge(got) } else { pacer.refund(batch.reduce(0) { $0 + Int($1.length) } - got) }
            }
        case .failed(let batch, let error):
            round.readsInFlight -= 1
            store.markLost(batch)
            throw error
        case .sync(let parts, let took):
            round.syncInFlight = false
            let report = try DirtyReportCodec.decode(parts)
            apply(epoch: report.epoch, layout: report.layout, dirty: report.dirty)
            measured.dirtyRate = Double(report.rate)
            hotPages = store.hotPages(maxHeat: options.policy.hotAfter)
            let seconds = took.inSeconds
            measured.roundTrip = measured.roundTrip == 0 ? seconds : min(measured.roundTrip, seconds)
            round.convergence.observe(pagesToPull: store.pagesToPull, firstPassDone: store.count(.remote) == 0)
        case .syncFailed(let error):
            round.syncInFlight = false
            throw error
        }
    }

    private func apply(epoch: UInt64, layout newLayout: [Region]?, dirty: [AddressRange]) {
        if let newLayout {
            layout = newLayout
            layoutEpoch = epoch
            store.reconcile(layout: newLayout)
            destination.adopt(layout: newLayout)
        }
        store.markDirty(dirty)
    }

    private func progressForPolicy(_ converged: Bool) -> FinalizePolicy.Progress {
        FinalizePolicy.Progress(cleanShare: store.cleanShare,
                                pagesLeft: store.totalPages - store.count(.clean),
                                pagesPullable: max(0, store.pagesToPull - hotPages), hotPages: hotPages,
                                firstPassDone: store.count(.remote) == 0,
                                bytesPerSecond: measured.linkRate, dirtyPagesPerSecond: measured.dirtyRate,
                                roundTripSeconds: measured.roundTrip, syncIntervalSeconds: options.syncInterval.inSeconds,
                                bytesMoved: bytesReceived,
                                memoryBytes: UInt64(store.totalPages) * pageSize,
                                elapsedSeconds: elapsed, converged: converged)
    }

    private func reportProgress(_ phaseName: String, force: Bool = false) {
        let now = ContinuousClock.now
        guard force || now - lastProgress >= .milliseconds(250) else { return }
        lastProgress = now
        events(.progress(LeecherProgress(
            pagesTotal: store.totalPages, pagesClean: store.count(.clean), pagesDirty: store.count(.dirty),
            pagesRemote: store.count(.remote) + store.count(.inFlight) + store.count(.inFlightStale),
            bytesReceived: bytesReceived, bytesPerSecond: measured.rate.perSecond,
            dirtyPagesPerSecond: measured.dirtyRate, elapsedSeconds: elapsed, phase: phaseName)))
    }

    // MARK: - Finalize

    /// Calls Finalize: the source freezes and its final layout and dirty set
    /// come back; every page not held clean is remote from then on. Returns
    /// the reply and the downtime the call took, in milliseconds.
    func finalize() async throws -> (reply: FinalizeReply, downtimeMilliseconds: Double) {
        let began = ContinuousClock.now
        let parts = try await link.callParts(.finalize, [])
        let report = try DirtyReportCodec.decode(parts)
        let downtime = (ContinuousClock.now - began).inSeconds * 1000
        guard let finalLayout = report.layout else {
            throw MigrationError.protocolViolation("the seeder's Finalize reply carries no layout")
        }
        apply(epoch: report.epoch, layout: finalLayout, dirty: report.dirty)
        store.markRemoteUnlessClean()
        let reply = FinalizeReply(layoutEpoch: report.epoch, layout: finalLayout, dirty: report.dirty,
                                  freezeMicroseconds: report.freeze)
        events(.finalized(downtimeMilliseconds: downtime, freezeMilliseconds: Double(report.freeze) / 1000,
                          dirtyPages: report.dirty.reduce(0) { $0 + $1.pageCount }, remotePages: store.count(.remote)))
        return (reply, downtime)
    }
}
