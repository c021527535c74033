// The leecher: pulls pages in the background in the heuristic's order with
// many requests in flight, learns which pulled pages were written since,
// finalizes when the policy says the rest is small, fills what is left by
// post-copy, checks the result against the frozen source, and only then
// confirms and writes the image. A dropped connection is resumed, not failed.
import Foundation

public struct LeecherOptions: Sendable {
    public var policy = FinalizePolicy()
    public var heuristic: any PullHeuristic = SequentialHeuristic()
    /// ReadAt requests in flight. 16 x 1 MiB keeps a loopback link and both
    /// cores busy without holding much memory.
    public var requestsInFlight = 16
    /// Pages per ReadAt (at most `MigrationLimits.maxPagesPerRead`); nil
    /// adapts the size to the link (`BatchSizer`).
    public var pagesPerRequest: Int? = nil
    /// How often pre-copy asks for the dirty set.
    public var syncInterval: Duration = .milliseconds(200)
    /// Compare every region with the frozen source's checksum before Complete.
    public var verify = true
    /// Abort instead of Complete at the end (the source is thawed): a dry run.
    public var abortAtEnd = false
    /// The seeder's key: its signature over the checksums must verify, so a
    /// hub in between cannot pose as the source (needs `verify`).
    public var seederKey: PublicKey? = nil
    /// With `seederKey`: the oldest signed freeze accepted, counted back from
    /// when this leecher started. A hub serves late leechers from a freeze
    /// made before they came, so this is not zero; an older statement is
    /// taken for an earlier migration of the same process replayed by a hub.
    public var maxFreezeAge: Duration = .seconds(600)
    /// The bandwidth cap (`--max-bandwidth`): each bulk ReadAt waits on it
    /// for the bytes it asks for (all-zero pages, which come back without
    /// bytes, are given back); touched pages never wait, only charge it.
    /// Nil: no cap.
    public var pacer: Pacer? = nil

    public init() {}
}

public struct LeecherProgress: Sendable {
    public var pagesTotal: Int
    public var pagesClean: Int
    public var pagesDirty: Int
    public var pagesRemote: Int
    public var bytesReceived: UInt64
    public var bytesPerSecond: Double
    public var dirtyPagesPerSecond: Double
    public var elapsedSeconds: Double
    public var phase: String
}

public enum LeecherEvent: Sendable {
    case connected(peer: String, pid: Int32, host: String, tracker: String, regions: Int, pages: Int)
    case progress(LeecherProgress)
    case finalizing(reason: String)
    case finalized(downtimeMilliseconds: Double, freezeMilliseconds: Double, dirtyPages: UInt64, remotePages: Int)
    case reconnecting(attempt: Int, reason: String)
    case resumed(phase: String)
    /// Every page is held: the checksum phase begins (the image, or the
    /// live memory, is hashed and compared with the frozen source's
    /// checksums). Nothing is confirmed to the seeder until it ends.
    case verifying(pages: Int)
    case verified(regions: Int)
    case complete(bytes: UInt64, seconds: Double, seederSays: String)
}

public struct LeecherSummary: Sendable {
    public var manifest: Manifest
    public var bytesReceived: UInt64
    public var seconds: Double
    public var downtimeMilliseconds: Double
    public var dirtyPagesAtFinalize: UInt64
    public var seederSays: String
}

public final class Leecher {
    public typealias Connector = SessionLink.Connector

    private let link: SessionLink
    /// How to open another connection: the companion lane for touched pages.
    private let connect: Connector
    /// The companion lane, opened at the first touched page; nil until then,
    /// or for good when the peer does not accept companions.
    private var priorityLink: SessionLink? = nil
    private var companionRefused = false
    private let sink: any PageSink
    /// The image path's writer; nil when pages go to live memory.
    private let image: ImageWriter?
    /// The post-copy path's live memory; nil when writing an image.
    private let live: LiveMemorySink?
    /// Issue 13 hook: the whole-process restore (CriuRestore.swift); nil otherwise.
    private var restore: CriuRestore? = nil
    private let options: LeecherOptions
    private let events: @Sendable (LeecherEvent) -> Void

    private var seeder: TrackReply? = nil
    private var store = PageStore(layout: [])
    private var layout: [Region] = [] {
        didSet {
            hugePages = MigrationLimits.wholeHugePages(in: layout)
            hugetlbRegions = layout.filter { $0.kind == .migrate && $0.isHugetlb }
        }
    }
    /// Every hugetlb region of `layout`, ascending: a touch in live memory
    /// fetches its whole huge page.
    private var hugetlbRegions: [Region] = []
    /// Hugetlb regions of `layout` whose pages fit one ReadAt, ascending:
    /// requests take their huge pages whole, so the seeder can re-arm them.
    private var hugePages: [Region] = []
    private var layoutEpoch: UInt64 = 0
    private var bytesReceived: UInt64 = 0
    private var dirtyRate: Double = 0
    private var started = ContinuousClock.now
    /// Wall-clock start, Unix milliseconds: signed freeze times are compared with it.
    private var startedWallMilliseconds: UInt64 = 0
    private var finalizeReply: FinalizeReply? = nil
    /// The Checksum call made at Finalize, cancelled if the migration fails.
    private var checksumCall: Task<[UInt8], any Error>? = nil
    private var downtime: Double = 0
    private var lastProgress = ContinuousClock.now
    private var rate = ByteRate()
    /// The best throughput measured: the link's capacity, for the policy
    /// (the current rate falls once only a few dirty pages are left to pull).
    private var linkRate: Double = 0
    /// The quickest Sync round trip seen, seconds.
    private var roundTrip: Double = 0
    /// Hot dirty pages (left for the end), counted when a dirty report lands.
    private var hotPages = 0
    private var sizer = BatchSizer()

    /// `migration` names the migration wanted from a hub; empty for a seeder.
    public convenience init(connect: @escaping Connector, sink: ImageWriter, options: LeecherOptions = .init(),
                            migration: String = "", events: @escaping @Sendable (LeecherEvent) -> Void = { _ in }) {
        self.init(connect: connect, sink: sink, image: sink, live: nil, options: options, migration: migration,
                  events: events)
    }

    /// A leecher whose pages end in live memory of this process: after
    /// Finalize, `memory.migratedMemory()` returns it while post-copy fills
    /// the rest, touched pages first (see LiveMemorySink and docs/postcopy.md).
    public convenience init(connect: @escaping Connector, memory: LiveMemorySink, options: LeecherOptions = .init(),
                            migration: String = "", events: @escaping @Sendable (LeecherEvent) -> Void = { _ in }) {
        self.init(connect: connect, sink: memory, image: nil, live: memory, options: options, migration: migration,
                  events: events)
    }

    /// Issue 13 hook: a leecher whose pages serve CRIU's restore of the
    /// whole process (CriuRestore.swift, Protocols/criu.md).
    public convenience init(connect: @escaping Connector, restore: CriuRestore, options: LeecherOptions = .init(),
                            migration: String = "", events: @escaping @Sendable (LeecherEvent) -> Void = { _ in }) {
        self.init(connect: connect, sink: restore.store, image: nil, live: nil, options: options, migration: migration,
                  events: events)
        self.restore = restore
    }

    private init(connect: @escaping Connector, sink: any PageSink, image: ImageWriter?, live: LiveMemorySink?,
                 options: LeecherOptions, migration: String, events: @escaping @Sendable (LeecherEvent) -> Void) {
        self.connect = connect
        self.link = SessionLink(migration: migration, connect: connect) { event in
            switch event {
            case .reconnecting(let attempt, let reason): events(.reconnecting(attempt: attempt, reason: reason))
            case .resumed(let phase): events(.resumed(phase: phase.description))
            }
        }
        self.sink = sink
        self.image = image
        self.live = live
        self.options = options
        self.events = events
    }

    /// Runs the whole migration. On error the seeder, if reachable, is told to
    /// abort, so the source runs on; no image is left behind.
    public func run() async throws -> LeecherSummary {
        started = .now
        startedWallMilliseconds = UInt64(max(0, Date().timeIntervalSince1970 * 1000))
        var restoring: Task<Void, any Error>? = nil // issue 13 hook
        do {
            let reply = try await openFirst()
            seeder = reply
            layout = reply.layout
            layoutEpoch = reply.layoutEpoch
            store = PageStore(layout: layout)
            if live != nil { try LiveMemorySink.checkHugePages(layout) }
            sink.adopt(layout: layout)
            events(.connected(peer: await link.peer, pid: reply.pid, host: reply.host,
                              tracker: reply.tracker, regions: layout.count, pages: store.totalPages))
            try await pull(precopy: true)
            try await finalize()
            // Issue 13 hook: CRIU restores the process beside post-copy.
            if let restore {
                try await restore.receiveImages(link: link)
                restoring = Task { try await restore.restoreProcess() }
            }
            // The source is frozen, so its checksums are final: the seeder
            // hashes it while post-copy runs and while we finish hashing the
            // image (its writer has hashed since Finalize) or the live memory.
            var request = WireWriter()
            request.ranges(layout.filter { $0.kind == .migrate }.map(\.range))
            let payload = request.bytes
            let expected: Task<[UInt8], any Error>? = options.verify ? Task { [link] in
                try await link.call(.checksum, payload)
            } : nil
            checksumCall = expected
            if let live {
                _ = try live.activate(layout: layout, clean: store.ranges(in: [.clean]))
            }
            try await pull(precopy: false)
            if options.verify { events(.verifying(pages: store.totalPages)) }
            var manifest = Manifest(sourcePid: reply.pid, sourceHost: reply.host, tracker: reply.tracker,
                                    created: "", downtimeMilliseconds: downtime, regions: [])
            do {
                if let image {
                    manifest = try await image.prepare(layout: layout, sourcePid: reply.pid, sourceHost: reply.host,
                                                       tracker: reply.tracker, downtimeMilliseconds: downtime)
                } else if let live {
                    try await live.waitForLocalFill()
                    manifest.regions = try live.manifestRegions(layout: layout)
                }
            } catch {
                expected?.cancel()
                throw error
            }
            if let expected { try verify(manifest, against: try await expected.value) }
            // Issue 13 hook: Complete lets CRIU kill the source; the process must run here first.
            try await restoring?.value
            // Interrupted before Complete: abort instead (below).
            try Task.checkCancellation()
            let said: String
            if options.abortAtEnd {
                said = try OutcomeReply.decode(try await link.call(.abort, [])).message
            } else {
                said = try await completeOnce()
            }
            try image?.commit()
            live?.finish()
            await link.close()
            await priorityLink?.close()
            let seconds = elapsed
            events(.complete(bytes: bytesReceived, seconds: seconds, seederSays: said))
            return LeecherSummary(manifest: manifest, bytesReceived: bytesReceived, seconds: seconds,
                                  downtimeMilliseconds: downtime,
                                  dirtyPagesAtFinalize: finalizeReply?.dirty.reduce(0) { $0 + $1.pageCount } ?? 0,
                                  seederSays: said)
        } catch {
            checksumCall?.cancel()
            restoring?.cancel() // issue 13 hook
            restore?.cancel()
            live?.fail("\(error)")
            // Cancelled (SIGINT, SIGTERM): say what became of the source, not
            // "CancellationError()".
            let cancelled = error is CancellationError || Task.isCancelled
            var source = "nothing was tracked or frozen yet: the source runs on as before"
            if seeder != nil {
                // Best effort: the source must run on. A seeder that cannot be
                // reached thaws it itself after its grace period. (An
                // unstructured task: it is not cancelled with this one.)
                let link = self.link
                let abort = Task<String, any Error> {
                    let reply = try await link.call(.abort, [])
                    return try OutcomeReply.decode(reply).message
                }
                let limit = Self.abortTimeout
                let timeout = Task {
                    try? await Task.sleep(for: limit)
                    abort.cancel()
                }
                switch await abort.result {
                case .success(let said):
                    source = said
                case .failure(let failure):
                    let grace = Double(self.seeder?.graceMilliseconds ?? 5000) / 1000
                    source = "the seeder did not take the abort (\(failure is CancellationError ? "no answer within \(limit)" : "\(failure)")); it thaws the source itself once we are gone for its grace period (\(grace) s)"
                }
                timeout.cancel()
            }
            await link.close()
            await priorityLink?.close()
            if cancelled { throw MigrationInterrupted(source: source) }
            throw error
        }
    }

    /// The first connection: handshake and Track. It is not resumed (there is
    /// no session yet), so a link lost here ends the migration; the error
    /// says at which step and that the source was never frozen. (The fault
    /// matrix's handshake cells: a seeder killed or a link cut mid-handshake
    /// used to end with only "127.0.0.1:N reset the connection", naming
    /// neither the seeder nor what became of the source.)
    private func openFirst() async throws -> TrackReply {
        do {
            return try await link.open()
        } catch let error as RPCError where error.code != .connectionClosed {
            throw error
        } catch let error where error is SocketError || error is RPCError {
            throw MigrationError.connectionLost(
                "could not open the migration with the seeder (handshake and Track): \(error); the source was not frozen and runs on: run the leecher again")
        }
    }

    /// How long an abort may take once the migration failed or was cancelled.
    static let abortTimeout: Duration = .seconds(2)

    /// Complete, once: if the reply was lost with the connection, the resumed
    /// session says whether it went through.
    private func completeOnce() async throws -> String {
        do {
            return try OutcomeReply.decode(try await link.call(.complete, [])).message
        } catch {
            if await link.phase == .completed { return "completed (confirmed after reconnecting)" }
            // The image is verified, but the source is not ours: whether the
            // seeder applied Complete cannot be known. Say so, so the user
            // checks the source rather than trusts a half-told story.
            guard error is MigrationError, let seeder else { throw error }
            throw MigrationError.connectionLost(
                "the seeder did not confirm Complete (\(error)); the image was verified but is not kept, since the source may run on: if Complete reached the seeder, pid \(seeder.pid) on \(seeder.host) is left as its --then says (stopped by default: resume it with kill -CONT), otherwise the seeder thaws it")
        }
    }

    private var elapsed: Double { seconds(ContinuousClock.now - started) }

    // MARK: - Pulling

    private enum JobResult: Sendable {
        /// A ReadAt reply; `touch`: asked for touched pages, out of the background order.
        case read([AddressRange], [[UInt8]], Duration, touch: Bool = false)
        case sync([[UInt8]], Duration)
        case failed([AddressRange], any Error)
        case syncFailed(any Error)
        /// Pages touched in live memory before they arrived.
        case touched([UInt64])
    }

    private static let wanted: Set<PageState> = [.remote, .dirty]

    /// Pulls until the finalize policy is met (pre-copy) or every page is held (post-copy).
    private func pull(precopy: Bool) async throws {
        var queue = options.heuristic.order(store, layout: layout)
        var cursor = 0
        var readsInFlight = 0
        var syncInFlight = false
        var lastSync = ContinuousClock.now
        var stopIssuing = false
        var needResync = false
        var bestToPull = Int.max
        var stalledSyncs = 0
        var listening = !precopy && (live != nil || restore != nil) // restore: issue 13 hook
        var listenerRunning = false
        var touchesInFlight = 0
        /// Rounds of the heuristic's order begun since a batch was last
        /// issued: a second one in a row means pre-copy has nothing it may
        /// send (hot pages wait), so it waits for the next dirty report.
        var roundsWithoutIssue = 0

        try await withThrowingTaskGroup(of: JobResult.self) { group in
            defer { group.cancelAll() }
            while true {
                // Cancelled (SIGINT, SIGTERM): a call ended by cancellation
                // may return what arrived so far rather than throw, so the
                // loop asks itself instead of waiting for a failed job.
                try Task.checkCancellation()
                // Post-copy into live memory: always one task waiting for touched pages.
                if listening && !listenerRunning, let priority = live?.priority ?? restore?.touches {
                    listenerRunning = true
                    group.addTask { .touched(await priority.next()) }
                }
                if precopy && !stopIssuing, let reason = options.policy.reason(progressForPolicy(stalledSyncs >= 5)) {
                    events(.finalizing(reason: reason))
                    stopIssuing = true
                }
                // Issue reads while there is room (post-copy background fill may be paused: benchmarks).
                let paused = !precopy && live?.backgroundFillPaused == true
                // Post-copy into live memory keeps less in flight, and nothing new while a
                // touched page is on its way: its reply queues behind every reply before it
                // on the one connection, so the window bounds first-touch latency.
                let window = listening ? min(options.requestsInFlight, live?.options.postCopyRequestsInFlight ?? options.requestsInFlight) : options.requestsInFlight
                while !stopIssuing, !paused, touchesInFlight == 0, readsInFlight < window {
                    guard let batch = nextBatch(&queue, &cursor, limit: listening ? live?.options.postCopyPagesPerRequest : nil,
                                                precopy: precopy) else { break }
                    roundsWithoutIssue = 0
                    store.markRequested(batch)
                    readsInFlight += 1
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
                // Ask for the dirty set now and then during pre-copy.
                let now = ContinuousClock.now
                if precopy, !stopIssuing, !syncInFlight, needResync || now - lastSync >= options.syncInterval {
                    syncInFlight = true
                    needResync = false
                    lastSync = now
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
                if readsInFlight == 0 && !syncInFlight && !(paused && listening) {
                    if stopIssuing { return }
                    if store.pagesToPull == 0 || (precopy && roundsWithoutIssue > 1) {
                        if !precopy { return }
                        // Everything held, or only hot pages left: wait for the next dirty report.
                        try await Task.sleep(until: lastSync + options.syncInterval)
                        roundsWithoutIssue = 0
                        continue
                    }
                    // The order is used up but pages are still wanted: a new round.
                    queue = options.heuristic.order(store, layout: layout)
                    cursor = 0
                    if queue.isEmpty { queue = store.ranges(in: Self.wanted) }
                    roundsWithoutIssue += 1
                    continue
                }
                guard let result = try await group.next() else { continue }
                switch result {
                case .touched(let pages):
                    listenerRunning = false
                    // Touched pages travel on their own connection, so their small
                    // replies do not wait behind the bulk replies of this one.
                    if priorityLink == nil && !companionRefused && !pages.isEmpty {
                        priorityLink = await link.companionLink(connect: connect)
                    }
                    let lane = companionRefused ? link : (priorityLink ?? link)
                    // Jump the queue: one small ReadAt per touched page, even when a
                    // background batch holds it already (that batch may be queued behind
                    // others; the page is installed by whichever reply lands first). A
                    // touched huge page comes whole (what it lacks: live memory stages
                    // the pages it holds clean), in requests of at most the read limit.
                    for page in pages {
                        for batch in touchRequests(page) {
                            store.markRequested(batch)
                            readsInFlight += 1
                            touchesInFlight += 1
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
                    // Empty: the requests were closed (the migration is ending); stop listening.
                    if pages.isEmpty { listening = false }
                case .read(let batch, let parts, let took, let touch):
                    readsInFlight -= 1
                    if touch {
                        touchesInFlight -= 1 // a touched page: not a sample for the batch sizer
                    } else {
                        sizer.observe(pages: batch.reduce(0) { $0 + Int($1.pageCount) }, took: took)
                    }
                    let before = bytesReceived
                    if try receive(batch, parts) { needResync = true }
                    if let pacer = options.pacer {
                        let got = Int(bytesReceived - before)
                        if touch { pacer.charge(got) } else { pacer.refund(batch.reduce(0) { $0 + Int($1.length) } - got) }
                    }
                case .failed(let batch, let error):
                    readsInFlight -= 1
                    store.markLost(batch)
                    throw error
                case .sync(let parts, let took):
                    syncInFlight = false
                    let report = try DirtyReportCodec.decode(parts)
                    apply(epoch: report.epoch, layout: report.layout, dirty: report.dirty)
                    dirtyRate = Double(report.rate)
                    hotPages = store.hotPages(maxHeat: options.policy.hotAfter)
                    roundTrip = roundTrip == 0 ? seconds(took) : min(roundTrip, seconds(took))
                    if store.count(.remote) == 0 {
                        if store.pagesToPull < bestToPull {
                            bestToPull = store.pagesToPull
                            stalledSyncs = 0
                        } else {
                            stalledSyncs += 1
                        }
                    }
                case .syncFailed(let error):
                    syncInFlight = false
                    throw error
                }
                reportProgress(precopy ? "pre-copy" : "post-copy")
            }
        }
    }

    /// The next ReadAt batch: pages of the queue that are still wanted, up to the request size.
    /// In pre-copy, hot dirty pages are skipped: they wait for the final dirty set.
    private func nextBatch(_ queue: inout [AddressRange], _ cursor: inout Int, limit pagesLimit: Int? = nil,
                           precopy: Bool) -> [AddressRange]? {
        let maxHeat = options.policy.hotAfter
        var batch: [AddressRange] = []
        var pages = 0
        var limit = min(pagesLimit ?? options.pagesPerRequest ?? sizer.pages, MigrationLimits.maxPagesPerRead)
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
    private func touchRequests(_ page: UInt64) -> [[AddressRange]] {
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
                if let last = batch.last, last.end == address {
                    batch[batch.count - 1].end = address + pageSize
                } else {
                    batch.append(AddressRange(start: address, end: address + pageSize))
                }
                pages += 1
            }
            address += pageSize
        }
        if !batch.isEmpty { requests.append(batch) }
        return requests
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

    /// Stores a ReadAt reply. Returns true when pages turned out unmapped (the layout moved).
    private func receive(_ batch: [AddressRange], _ parts: [[UInt8]]) throws -> Bool {
        var layoutMoved = false
        var arrived: [AddressRange] = []
        // Runs are checked against the request by binary search: a batch of
        // scattered dirty pages holds up to 1024 ranges.
        let asked = batch.sorted { $0.start < $1.start }
        func wasAsked(_ run: AddressRange) -> Bool {
            var low = 0, high = asked.count
            while low < high {
                let mid = (low + high) / 2
                if asked[mid].end <= run.start { low = mid + 1 } else { high = mid }
            }
            return low < asked.count && asked[low].start <= run.start && run.end <= asked[low].end
        }
        for part in parts where !part.isEmpty {
            let runs: [PageRun]
            do {
                runs = try PagePart.parse(part)
            } catch {
                throw MigrationError.protocolViolation("the seeder sent a malformed page batch: \(error)")
            }
            try part.withUnsafeBytes { bytes in
                for run in runs {
                    guard wasAsked(run.range) else {
                        throw MigrationError.protocolViolation("the seeder sent pages \(run.range) that were not asked for")
                    }
                    switch run.kind {
                    case .data:
                        try sink.store(run.range, from: part, at: run.dataOffset)
                        bytesReceived += run.range.length
                        arrived.append(run.range)
                    case .zero:
                        try sink.storeZero(run.range)
                        arrived.append(run.range)
                    case .hole:
                        try sink.storeHole(run.range)
                        arrived.append(run.range)
                    case .unmapped:
                        layoutMoved = true
                        try countUnmapped(run.range)
                    }
                }
            }
        }
        store.markArrived(arrived)
        // Whatever was asked and not answered (unmapped pages) is asked again
        // once the layout says whether it still exists.
        store.markLost(batch)
        rate.add(bytesReceived)
        // The first replies land in a burst: a rate over a few milliseconds
        // says nothing of the link (it once read 45 ms for 1 GiB and froze
        // the source with every page still remote).
        if rate.span >= ByteRate.trustedSpan { linkRate = max(linkRate, rate.perSecond) }
        return layoutMoved
    }

    /// Pages of the layout answered `unmapped` again and again: a page the
    /// seeder cannot supply must end the migration, never be waited for.
    private var unmappedAnswers: [UInt64: Int] = [:]
    static let maxUnmappedAnswers = 50

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

    private func apply(epoch: UInt64, layout newLayout: [Region]?, dirty: [AddressRange]) {
        if let newLayout {
            layout = newLayout
            layoutEpoch = epoch
            store.reconcile(layout: newLayout)
            sink.adopt(layout: newLayout)
        }
        store.markDirty(dirty)
    }

    private func progressForPolicy(_ converged: Bool) -> FinalizePolicy.Progress {
        FinalizePolicy.Progress(cleanShare: store.cleanShare,
                                pagesLeft: store.totalPages - store.count(.clean),
                                pagesPullable: max(0, store.pagesToPull - hotPages), hotPages: hotPages,
                                firstPassDone: store.count(.remote) == 0,
                                bytesPerSecond: linkRate, dirtyPagesPerSecond: dirtyRate,
                                roundTripSeconds: roundTrip, syncIntervalSeconds: seconds(options.syncInterval),
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
            bytesReceived: bytesReceived, bytesPerSecond: rate.perSecond, dirtyPagesPerSecond: dirtyRate,
            elapsedSeconds: elapsed, phase: phaseName)))
    }

    // MARK: - Finalize and verify

    private func finalize() async throws {
        let began = ContinuousClock.now
        let parts = try await link.callParts(.finalize, [])
        let report = try DirtyReportCodec.decode(parts)
        downtime = seconds(ContinuousClock.now - began) * 1000
        guard let finalLayout = report.layout else {
            throw MigrationError.protocolViolation("the seeder's Finalize reply carries no layout")
        }
        apply(epoch: report.epoch, layout: finalLayout, dirty: report.dirty)
        store.markRemoteUnlessClean()
        sink.sourceFrozen(layout: finalLayout, clean: store.ranges(in: [.clean]))
        finalizeReply = FinalizeReply(layoutEpoch: report.epoch, layout: finalLayout, dirty: report.dirty,
                                      freezeMicroseconds: report.freeze)
        events(.finalized(downtimeMilliseconds: downtime, freezeMilliseconds: Double(report.freeze) / 1000,
                          dirtyPages: report.dirty.reduce(0) { $0 + $1.pageCount }, remotePages: store.count(.remote)))
    }

    /// Compares each migrated region of the image with the seeder's checksum of the frozen source.
    private func verify(_ manifest: Manifest, against encoded: [UInt8]) throws {
        let regions = manifest.regions.filter { $0.file != nil }
        let reply = try ChecksumReply.decode(encoded)
        if let pinned = options.seederKey, let seeder {
            let age = UInt64(max(0, seconds(options.maxFreezeAge)) * 1000)
            try reply.verifySigned(by: pinned, pid: seeder.pid, host: seeder.host, layout: layout,
                                   ranges: regions.map { AddressRange(start: $0.start, end: $0.end) },
                                   notFrozenBefore: startedWallMilliseconds > age ? startedWallMilliseconds - age : 0)
        }
        guard reply.digests.count == regions.count else {
            throw MigrationError.protocolViolation("the seeder sent \(reply.digests.count) checksums for \(regions.count) regions")
        }
        for (region, digest) in zip(regions, reply.digests) where digest.hexString != region.blake2b {
            throw MigrationError.image(
                "region 0x\(String(region.start, radix: 16))-0x\(String(region.end, radix: 16)) (\(region.name)) does not match the frozen source; the migration is aborted and the source thawed")
        }
        events(.verified(regions: regions.count))
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
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
        let rate = Double(bytes) / seconds(now - start)
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

/// Bytes per second over the last two seconds.
struct ByteRate {
    private var samples: [(ContinuousClock.Instant, UInt64)] = []

    mutating func add(_ total: UInt64) {
        let now = ContinuousClock.now
        samples.append((now, total))
        while let first = samples.first, now - first.0 > .seconds(2), samples.count > 2 { samples.removeFirst() }
    }

    var perSecond: Double {
        guard let first = samples.first, let last = samples.last, last.0 > first.0 else { return 0 }
        return Double(last.1 - first.1) / seconds(last.0 - first.0)
    }

    /// How long the samples cover.
    var span: Duration {
        guard let first = samples.first, let last = samples.last else { return .zero }
        return last.0 - first.0
    }

    /// A rate measured over at least this long is taken as the link's.
    static let trustedSpan: Duration = .milliseconds(500)
}
