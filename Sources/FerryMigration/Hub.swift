// The star hub: leechers call it exactly as they would call a seeder; it
// pulls each page once from upstream (a seeder, or another hub) and serves
// every leecher from its cache. Dirty state per leecher is kept with page
// versions: a page's version goes up each time upstream reports it written,
// and each leecher remembers the version it was sent, so an early and a late
// leecher each learn exactly what they lack. The source freezes once for all
// of them, when the finalize policy says so.
import Foundation
import Synchronization

public enum HubFinalizePolicy: String, Sendable, CaseIterable {
    /// Freeze once every attached leecher has asked to finalize.
    case whenAllReady = "when-all-ready"
    /// Freeze when the first leecher asks.
    case first
    /// Freeze when the operator says so (`HubService.finalizeNow()`, SIGUSR1 on `hub serve`).
    case manual
}

public struct HubOptions: Sendable {
    public var finalize: HubFinalizePolicy = .whenAllReady
    /// Cached page bytes kept in memory; more spills to a file in `spillDirectory`.
    public var memoryLimit = 1 << 30
    public var spillDirectory = NSTemporaryDirectory()
    /// How long a leecher's session outlives its connection.
    public var grace: Duration = .seconds(5)
    /// Upstream dirty reports are at most this old when a leecher asks for
    /// one. The leecher's own default interval: asking upstream more often
    /// than leechers ask the hub only re-fetches hot pages more often
    /// (measured: 100 ms read 1.18x the pages of one leecher with 16, 200 ms 1.12x).
    public var syncInterval: Duration = .milliseconds(200)
    public var host = ProcessInfo.processInfo.hostName
    /// The bandwidth cap on what the hub sends its leechers (`--max-bandwidth`):
    /// bulk ReadAt parts wait on it, a companion connection's (post-copy
    /// touches) only charge it. Nil: no cap.
    public var pacer: Pacer? = nil
    /// Test-only misbehaviour: a hub that lies, to show what leechers catch.
    var tamper: HubTamper? = nil

    public init() {}
}

/// How a test hub lies (tests only; `hub serve` never sets it).
struct HubTamper: Sendable {
    /// Flips the first byte of this page in every ReadAt reply.
    var alterPage: UInt64? = nil
    /// Answers Checksum with unsigned digests of what the hub serves,
    /// instead of forwarding the seeder's answer.
    var forgeChecksums = false
}

public enum HubEvent: Sendable {
    case upstream(migration: String, pid: Int32, host: String)
    case leecherJoined(peer: String, migration: String)
    case leecherLeft(peer: String, reason: String)
    case waitingToFinalize(ready: Int, attached: Int)
    case finalized(migration: String, freezeMilliseconds: Double, dirtyPages: UInt64)
    case upstreamLost(migration: String, reason: String)
    case completed(migration: String, message: String)
    /// Every leecher left after the freeze and none completed: the hub told
    /// the seeder to abort, which thaws the source.
    case abandoned(migration: String, message: String)
}

/// Relays migrations from upstream seeders to many leechers.
public final class HubService: Sendable {
    public let options: HubOptions
    private let events: @Sendable (HubEvent) -> Void
    /// Counters for `--metrics` (Metrics.swift); `metricGauges` reads the rest.
    public let metrics = MigrationMetrics(role: .hub)
    private let migrations = Mutex<[String: HubMigration]>([:])
    /// Seeders that dialed in (`seeder serve --via`), by migration name, for
    /// the upstream link to take (first connection and reconnections).
    private let dialedIn = Mutex<[String: [(RPCClient, String)]]>([:])

    public init(options: HubOptions = .init(), events: @escaping @Sendable (HubEvent) -> Void = { _ in }) {
        self.options = options
        self.events = events
    }

    /// Adds an upstream the hub dials itself (a seeder or another hub).
    /// Returns the migration's name, from the upstream's Hello.
    @discardableResult
    public func addUpstream(connect: @escaping SessionLink.Connector, name wanted: String = "") async throws -> String {
        let transport = try await connect()
        let client = RPCClient(transport: transport)
        defer { client.close() }
        let hello = try HelloReply.decode(try await client.call(MigrationMethod.hello.rawValue, []))
        let name = wanted.isEmpty ? hello.migration : wanted
        let link = SessionLink(migration: wanted, connect: connect)
        register(HubMigration(name: name, link: link, options: options, events: events, metrics: metrics))
        events(.upstream(migration: name, pid: hello.pid, host: hello.host))
        return name
    }

    /// A seeder dialed in: learn its migration's name, and keep the
    /// connection for the upstream link, which calls on it as on any seeder.
    public func acceptSeeder(_ transport: FrameTransport) async throws {
        let client = RPCClient(transport: transport)
        let hello: HelloReply
        do {
            hello = try HelloReply.decode(try await client.call(MigrationMethod.hello.rawValue, []))
        } catch {
            client.close()
            throw error
        }
        // The link takes this client as it is: the seeder answers on the
        // connection it opened.
        let name = hello.migration.isEmpty ? "pid-\(hello.pid)" : hello.migration
        dialedIn.withLock { $0[name, default: []].append((client, transport.peerDescription)) }
        let known = migrations.withLock { $0[name] != nil }
        if !known {
            let link = SessionLink(migration: "", connectClient: { [self] in try await self.takeDialedIn(name) })
            register(HubMigration(name: name, link: link, options: options, events: events, metrics: metrics))
            events(.upstream(migration: name, pid: hello.pid, host: hello.host))
        }
    }

    private func takeDialedIn(_ name: String) async throws -> (RPCClient, String) {
        let deadline = ContinuousClock.now + options.grace
        while ContinuousClock.now < deadline {
            if let waiting = dialedIn.withLock({ $0[name]?.isEmpty == false ? $0[name]!.removeFirst() : nil }) {
                return waiting
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        throw MigrationError.connectionLost("the seeder of migration '\(name)' did not dial in again within \(options.grace)")
    }

    private func register(_ migration: HubMigration) {
        migrations.withLock { $0[migration.name] = migration }
    }

    /// The state `--metrics` shows: the relayed migrations by phase, and
    /// the leechers attached to them.
    public var metricGauges: MigrationMetrics.Gauges {
        var gauges = MigrationMetrics.Gauges()
        for migration in migrations.withLock({ Array($0.values) }) {
            let (phase, attached) = migration.metricState
            gauges.migrationsByPhase[phase, default: 0] += 1
            gauges.leechersConnected += attached
        }
        return gauges
    }

    /// The names of the migrations the hub relays.
    public var migrationNames: [String] { migrations.withLock { Array($0.keys).sorted() } }

    /// Upstream pages read so far, for one migration (statistics and tests).
    public func upstreamPagesFetched(_ name: String) -> UInt64 {
        migrations.withLock { $0[name] }?.pagesFetched ?? 0
    }

    /// Waits until a migration is frozen and its whole frozen image is
    /// cached (or `limit` passes); true when it is. Tests and benchmarks use
    /// it to cut the upstream at a known point.
    func waitUntilFilled(_ name: String, limit: Duration = .seconds(30)) async -> Bool {
        guard let migration = migrations.withLock({ $0[name] }) else { return false }
        return await migration.waitUntilFilled(limit: limit)
    }

    /// The operator's finalize, for `--finalize manual`.
    public func finalizeNow() {
        for migration in migrations.withLock({ Array($0.values) }) { migration.operatorFinalize() }
    }

    /// Serves one authenticated leecher connection until it ends.
    public func serve(_ transport: FrameTransport) async {
        let connection = HubConnection(peer: transport.peerDescription)
        metrics.connected()
        let reason = await answerRPCs(on: transport) { [self] method, payload, parts in
            do {
                return try await self.handle(method, payload, parts, connection)
            } catch {
                metrics.error(.request)
                throw error
            }
        }.reason
        if !connection.companion.load(ordering: .acquiring),
           let (migration, leecher) = connection.binding.withLock({ $0 }) {
            // A leecher that completed, or left with Abort, ended its session itself.
            if leecher.state.withLock({ !$0.completed && $0.attached }) && !migration.isOver {
                metrics.error(.connectionLost)
            }
            migration.leecherDisconnected(leecher, reason: reason)
            events(.leecherLeft(peer: connection.peer, reason: reason))
        }
    }

    private func handle(_ method: UInt16, _ payload: [UInt8], _ parts: RPCPartWriter,
                        _ connection: HubConnection) async throws -> [UInt8] {
        guard let known = MigrationMethod(rawValue: method) else {
            throw RPCError(code: .unknownMethod, message: "unknown method 0x\(String(method, radix: 16))")
        }
        switch known {
        case .hello:
            let all = migrations.withLock { Array($0.values) }
            return HelloReply(migration: all.count == 1 ? all[0].name : "", pid: 0, host: options.host,
                              phase: nil).encode()
        case .track:
            let request = try TrackRequest.decode(payload)
            let all = migrations.withLock { $0 }
            let migration: HubMigration
            if request.migration.isEmpty {
                guard all.count == 1, let only = all.values.first else {
                    throw RPCError(code: .badRequest, message: all.isEmpty
                        ? "this hub relays no migration yet: start the seeder (or its --via) first"
                        : "this hub relays \(all.count) migrations (\(all.keys.sorted().joined(separator: ", "))): name one with --migration")
                }
                migration = only
            } else {
                guard let named = all[request.migration] else {
                    throw RPCError(code: .badRequest,
                                   message: "this hub relays no migration named '\(request.migration)'; it has: \(all.keys.sorted().joined(separator: ", "))")
                }
                migration = named
            }
            let (leecher, reply) = try await migration.track(request, peer: connection.peer)
            connection.binding.withLock { $0 = (migration, leecher) }
            connection.companion.store(request.companion, ordering: .releasing)
            events(.leecherJoined(peer: connection.peer, migration: migration.name))
            return reply.encode()
        default:
            if connection.companion.load(ordering: .acquiring) && known != .readAt {
                throw RPCError(code: .badRequest, message: "a companion connection may only ReadAt")
            }
            guard let (migration, leecher) = connection.binding.withLock({ $0 }) else {
                throw RPCError(code: .badRequest, message: "call Track first")
            }
            return try await migration.handle(known, payload, parts, leecher,
                                              urgent: connection.companion.load(ordering: .acquiring))
        }
    }
}

/// Which migration and leecher session a connection speaks for.
final class HubConnection: Sendable {
    let peer: String
    let binding = Mutex<(HubMigration, HubLeecher)?>(nil)
    /// A companion connection: priority ReadAt for a session another connection owns.
    let companion = Atomic<Bool>(false)
    init(peer: String) { self.peer = peer }
}

/// One leecher's view of a hub migration.
final class HubLeecher: Sendable {
    let session: [UInt8]
    let peer: String
    struct State {
        /// The version of each page as last sent to this leecher.
        var sent = PageVersionMap()
        var ready = false
        var completed = false
        var attached = true
        var owner = 0
    }
    let state = Mutex(State())
    /// What this leecher's ReadAt requests may hold at once.
    let readBudget = ByteBudget(bytes: MigrationLimits.readBudgetPerConnection)
    init(session: [UInt8], peer: String) {
        self.session = session
        self.peer = peer
    }
}

/// One upstream migration and every leecher pulling it.
final class HubMigration: Sendable {
    let name: String
    let options: HubOptions
    private let events: @Sendable (HubEvent) -> Void
    private let link: SessionLink
    private let metrics: MigrationMetrics

    private struct State {
        var started: Task<TrackReply, any Error>? = nil
        var info: TrackReply? = nil
        var phase: SessionPhase = .tracking
        var layout: [Region] = []
        var layoutEpoch: UInt64 = 0
        var versions: [UInt64: UInt32] = [:]
        var fetching: [UInt64: Task<Void, any Error>] = [:]
        var leechers: [HubLeecher] = []
        var finalized: FinalizeReply? = nil
        var finalizing: Task<FinalizeReply, any Error>? = nil
        var operatorSaidFinalize = false
        /// Checksum replies by the ranges asked: the upstream is asked once
        /// per set of ranges, and concurrent askers share the one call (the
        /// upstream may be gone by the time a second would be made).
        var checksums: [[AddressRange]: Task<[UInt8], any Error>] = [:]
        var lastSync: ContinuousClock.Instant? = nil
        var syncing: Task<Void, any Error>? = nil
        var upstreamFailure: String? = nil
        var upstreamCompleted: String? = nil
        var pagesFetched: UInt64 = 0
        var filling: Task<Void, Never>? = nil
        /// Pages upstream said are not mapped in the frozen source, at the
        /// version asked: nothing to fetch. (Before the freeze such an answer
        /// is only true for a moment: a heap trimmed and grown back between
        /// two scans looks unchanged to the next layout, so the page is asked
        /// again each time.)
        var unmappedAt: [UInt64: UInt32] = [:]
        /// Set when every leecher left after the freeze and the hub told the
        /// seeder to abort (the source thaws): nothing more to serve.
        var abandoned: String? = nil
        /// The seeder's answer to the hub's Abort of an abandoned migration.
        var upstreamAborted: String? = nil
        /// Upstream Complete was started: leechers completing at the same
        /// time must not send it twice (the second would be refused).
        var completing = false
    }
    private let state = Mutex(State())
    private let cache: PageCache
    private let cacheLock = Mutex(())

    init(name: String, link: SessionLink, options: HubOptions, events: @escaping @Sendable (HubEvent) -> Void,
         metrics: MigrationMetrics = MigrationMetrics(role: .hub)) {
        self.name = name
        self.options = options
        self.events = events
        self.link = link
        self.metrics = metrics
        metrics.entered(.tracking)
        cache = PageCache(memoryLimit: options.memoryLimit, spillDirectory: options.spillDirectory)
    }

    var pagesFetched: UInt64 { state.withLock { $0.pagesFetched } }

    /// For `--metrics`: the phase as leechers would see it, and how many
    /// leechers are attached.
    var metricState: (SessionPhase, Int) {
        state.withLock { s in
            let phase: SessionPhase = s.abandoned != nil ? .aborted
                : s.upstreamCompleted != nil ? .completed
                : s.finalized != nil ? .frozen : .tracking
            return (phase, s.leechers.filter { $0.state.withLock { $0.attached } }.count)
        }
    }

    /// Completed or abandoned: a leecher leaving now is no error.
    var isOver: Bool { state.withLock { $0.abandoned != nil || $0.upstreamCompleted != nil } }

    func waitUntilFilled(limit: Duration) async -> Bool {
        let deadline = ContinuousClock.now + limit
        while ContinuousClock.now < deadline {
            if let filling = state.withLock({ $0.filling }) {
                await filling.value
                return true
            }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return false
    }

    // MARK: Upstream

    /// Starts the upstream session once, for all leechers.
    private func upstreamInfo() async throws -> TrackReply {
        let task = state.withLock { s -> Task<TrackReply, any Error> in
            if let started = s.started { return started }
            let task = Task { [link] in try await link.open() }
            s.started = task
            return task
        }
        do {
            let reply = try await task.value
            state.withLock { s in
                if s.info == nil {
                    s.info = reply
                    s.layout = reply.layout
                    s.layoutEpoch = reply.layoutEpoch
                    s.phase = reply.phase
                }
            }
            return reply
        } catch {
            state.withLock { $0.started = nil }
            throw RPCError(code: .unavailable, message: "the hub cannot reach the seeder of migration '\(name)': \(error)")
        }
    }

    private func upstreamFailed(_ error: any Error) -> RPCError {
        let message = "the hub lost the seeder of migration '\(name)': \(error)"
        let first = state.withLock { s -> Bool in
            defer { if s.upstreamFailure == nil { s.upstreamFailure = message } }
            return s.upstreamFailure == nil
        }
        if first {
            metrics.error(.upstreamLost)
            events(.upstreamLost(migration: name, reason: "\(error)"))
        }
        return RPCError(code: .unavailable, message: message)
    }

    /// A fresh upstream dirty report, at most `syncInterval` old, shared by
    /// all leechers asking at the same time.
    private func syncUpstream() async throws {
        let task = state.withLock { s -> Task<Void, any Error>? in
            // Once Finalize is under way, its reply says everything a Sync
            // would (and it waits for the Sync already in flight).
            guard s.phase == .tracking, s.upstreamFailure == nil, s.finalizing == nil else { return nil }
            if let syncing = s.syncing { return syncing }
            if let last = s.lastSync, ContinuousClock.now - last < options.syncInterval { return nil }
            let epoch = s.layoutEpoch
            let task = Task { [link] in
                var w = WireWriter()
                w.u64(epoch)
                let parts = try await link.callParts(.sync, w.bytes)
                let report = try DirtyReportCodec.decode(parts)
                self.metrics.dirtyRate(Double(report.rate))
                self.applyUpstreamReport(epoch: report.epoch, layout: report.layout, dirty: report.dirty,
                                         fromSync: true)
            }
            s.syncing = task
            return task
        }
        guard let task else { return }
        defer { state.withLock { s in s.syncing = nil; s.lastSync = .now } }
        do {
            try await task.value
        } catch {
            throw upstreamFailed(error)
        }
    }

    /// Every page upstream reports written gets a new version: cached copies
    /// and the copies leechers hold of it are stale from now on. So does every
    /// page of memory that appeared since the last layout (see below).
    ///
    /// Reports must be applied in the order upstream made them, and none may
    /// be skipped: the layouts they carry are the only record of memory that
    /// vanished and came back (`finalize` waits for the Sync in flight).
    private func applyUpstreamReport(epoch: UInt64, layout: [Region]?, dirty: [AddressRange], fromSync: Bool = false) {
        state.withLock { s in
            // Nothing upstream said before the freeze can follow its reply.
            if fromSync && s.finalized != nil { return }
            var changed: [AddressRange] = []
            if let layout {
                // Memory that appeared, or whose backing changed, is new: what
                // the hub cached or found unmapped at those addresses belongs
                // to an earlier mapping. Upstream does not report it dirty:
                // for the seeder, pages of a new mapping were never sent, so
                // they cannot have been written since. (A heap that shrinks
                // and grows back, a mapping unmapped and mapped again at the
                // same address: without this the hub served the old bytes,
                // or answered "unmapped" for a mapped page forever.)
                changed = LayoutChange.diff(old: s.layout, new: layout).newlyDirty
                s.layout = layout
                s.layoutEpoch = epoch
            }
            for range in Self.renewed(dirty + changed, layout: s.layout) {
                metrics.foundDirty(pages: Int(range.pageCount))
                var page = range.start
                while page < range.end {
                    s.versions[page, default: 0] &+= 1
                    page += pageSize
                }
            }
        }
    }

    /// The pages of `ranges` that get a new version: only pages the layout
    /// migrates can be dirty. A wider range, from a broken or hostile
    /// seeder, would make the hub walk (and count versions for) pages that
    /// do not exist: one range of 1 TiB is 268 million of them.
    static func renewed(_ ranges: [AddressRange], layout: [Region]) -> [AddressRange] {
        let migratable = Ranges.merge(layout.filter { $0.kind == .migrate }.map(\.range))
        return Ranges.intersect(Ranges.merge(ranges), migratable)
    }

    /// Makes sure every page of `pages` is cached at its current version,
    /// fetching what is missing once, however many leechers ask.
    /// Rounds of fetching after the freeze before giving up. Versions only
    /// move then when the Finalize reply lands while a fetch is in flight, so
    /// a second round normally ends it; more means something is wrong.
    private static let maxFetchRounds = 8

    /// Returns how many of `pages` were missing at the first look (the
    /// rest were served from the cache).
    @discardableResult
    private func ensureCached(_ pages: [UInt64]) async throws -> Int {
        var firstMissing: Int? = nil
        for _ in 0..<Self.maxFetchRounds {
            var waits: [Task<Void, any Error>] = []
            var missing: [UInt64] = []
            let (versions, failure) = state.withLock { s -> ([UInt64: UInt32], String?) in
                var vs: [UInt64: UInt32] = [:]
                for page in pages where s.unmappedAt[page] != s.versions[page, default: 0] {
                    vs[page] = s.versions[page, default: 0]
                }
                return (vs, s.upstreamFailure)
            }
            cacheLock.withLock { _ in
                for (page, version) in versions where cache.entry(page)?.version != version { missing.append(page) }
            }
            if firstMissing == nil { firstMissing = missing.count }
            if missing.isEmpty { return firstMissing! }
            if let failure { throw RPCError(code: .unavailable, message: failure) }
            state.withLock { s in
                var toFetch: [UInt64] = []
                for page in missing {
                    if let task = s.fetching[page] { waits.append(task) } else { toFetch.append(page) }
                }
                for batch in Self.batches(toFetch) {
                    let task = Task { [link] in
                        try await self.fetch(batch, link: link)
                    }
                    for range in batch {
                        var page = range.start
                        while page < range.end {
                            s.fetching[page] = task
                            page += pageSize
                        }
                    }
                    waits.append(task)
                }
            }
            for task in waits {
                do {
                    try await task.value
                } catch let error as RPCError {
                    throw error
                } catch {
                    throw upstreamFailed(error)
                }
            }
            // While the source runs, a page cached at an older version is
            // fine to serve: the leecher is told the version it got, so the
            // next dirty report names it. Chasing the newest version here
            // could fail a busy page for nothing.
            if state.withLock({ $0.phase == .tracking }) { return firstMissing! }
            // After the freeze, pages reported dirty while in flight have a
            // newer version now: go round again.
        }
        throw RPCError(code: .unavailable, message: "pages of migration '\(name)' keep changing faster than the hub can fetch them")
    }

    private static func batches(_ pages: [UInt64]) -> [[AddressRange]] {
        var out: [[AddressRange]] = []
        var current: [AddressRange] = []
        var count = 0
        for page in pages.sorted() {
            if let last = current.last, last.end == page {
                current[current.count - 1].end = page + pageSize
            } else {
                current.append(AddressRange(start: page, end: page + pageSize))
            }
            count += 1
            if count == MigrationLimits.maxPagesPerRead {
                out.append(current)
                current = []
                count = 0
            }
        }
        if !current.isEmpty { out.append(current) }
        return out
    }

    /// One upstream ReadAt; stores each page at the version it had when asked.
    private func fetch(_ ranges: [AddressRange], link: SessionLink) async throws {
        let (asked, frozen) = state.withLock { s -> ([UInt64: UInt32], Bool) in
            var vs: [UInt64: UInt32] = [:]
            for range in ranges {
                var page = range.start
                while page < range.end {
                    vs[page] = s.versions[page, default: 0]
                    page += pageSize
                }
            }
            return (vs, s.phase == .frozen)
        }
        defer {
            state.withLock { s in
                for page in asked.keys { s.fetching[page] = nil }
            }
        }
        let parts = try await link.callParts(.readAt, ReadRequest(ranges: ranges).encode())
        var fetched: UInt64 = 0
        var unmapped: [UInt64] = []
        metrics.fetchedUpstream(pages: asked.count, bytes: parts.reduce(0) { $0 + $1.count })
        for part in parts where !part.isEmpty {
            let runs = try PagePart.parse(part)
            try part.withUnsafeBytes { bytes in
                try cacheLock.withLock { _ in
                    for run in runs {
                        var page = run.range.start
                        while page < run.range.end {
                            guard let version = asked[page] else {
                                throw MigrationError.protocolViolation("upstream sent page 0x\(String(page, radix: 16)), not asked for")
                            }
                            switch run.kind {
                            case .data:
                                let offset = run.dataOffset + Int(page - run.range.start)
                                try cache.store(page, version: version,
                                                data: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + Int(pageSize)]))
                            case .zero:
                                try cache.store(page, version: version, data: nil)
                            case .hole:
                                try cache.store(page, version: version, data: nil, hole: true)
                            case .unmapped:
                                cache.forget(page)
                                unmapped.append(page)
                            }
                            fetched += 1
                            page += pageSize
                        }
                    }
                }
            }
        }
        state.withLock { s in
            s.pagesFetched += fetched
            if frozen {
                for page in unmapped { s.unmappedAt[page] = asked[page] }
            }
        }
    }

    // MARK: Leechers

    func track(_ request: TrackRequest, peer: String) async throws -> (HubLeecher, TrackReply) {
        guard request.version == MigrationLimits.version else {
            throw RPCError(code: .badRequest, message: "migration protocol version \(request.version) is not supported; this hub speaks \(MigrationLimits.version)")
        }
        let info = try await upstreamInfo()
        return try state.withLock { s in
            if let abandoned = s.abandoned {
                throw RPCError(code: .unavailable, message: abandoned)
            }
            // Before the freeze the hub holds only part of the image: without
            // its upstream, a new leecher could never finish.
            if let failure = s.upstreamFailure, s.finalized == nil, request.resume == nil {
                throw RPCError(code: .unavailable, message: failure)
            }
            let leecher: HubLeecher
            if let resume = request.resume {
                guard let known = s.leechers.first(where: { $0.session == resume }) else {
                    throw RPCError(code: .badRequest, message: "no session to resume on this hub for migration '\(name)'")
                }
                leecher = known
                if !request.companion { metrics.resumed() }
            } else {
                leecher = HubLeecher(session: (0..<16).map { _ in UInt8.random(in: 0...255) }, peer: peer)
                s.leechers.append(leecher)
            }
            // A companion connection (priority reads) joins without taking the session.
            if !request.companion {
                leecher.state.withLock { l in
                    l.attached = true
                    l.owner += 1
                }
            }
            let phase: SessionPhase = leecher.state.withLock { $0.completed } ? .completed : (s.finalized == nil ? .tracking : .frozen)
            let grace = UInt32(clamping: options.grace.components.seconds * 1000
                + options.grace.components.attoseconds / 1_000_000_000_000_000)
            return (leecher, TrackReply(session: leecher.session, phase: phase, pid: info.pid, host: info.host,
                                        tracker: info.tracker, graceMilliseconds: grace,
                                        layoutEpoch: s.layoutEpoch, layout: s.layout))
        }
    }

    func leecherDisconnected(_ leecher: HubLeecher, reason: String) {
        let owner = leecher.state.withLock { l -> Int in
            l.attached = false
            return l.owner
        }
        let grace = options.grace
        Task {
            try? await Task.sleep(for: grace)
            // A completed leecher stays on the list: it counts as done when
            // the hub decides between Complete and Abort upstream.
            let gone = leecher.state.withLock { !$0.attached && $0.owner == owner && !$0.completed }
            if gone { await self.leecherGone(leecher) }
        }
    }

    /// A leecher gone for good (aborted, or away past the grace period) no
    /// longer holds up a finalize or a complete; if it was the last one after
    /// the freeze, the source is let go.
    private func leecherGone(_ leecher: HubLeecher) async {
        state.withLock { s in s.leechers.removeAll { $0 === leecher } }
        maybeFinalize()
        await maybeCompleteUpstream()
    }

    func handle(_ method: MigrationMethod, _ payload: [UInt8], _ parts: RPCPartWriter,
                _ leecher: HubLeecher, urgent: Bool = false) async throws -> [UInt8] {
        switch method {
        case .readAt:
            let request = try ReadRequest.decode(payload)
            try await leecher.readBudget.withBytes(MigrationLimits.readAtHolds) {
                try await readAt(request, parts, leecher, urgent: urgent)
            }
            return []
        case .sync:
            var reader = WireReader(payload)
            let epoch = try reader.u64("layout epoch")
            try reader.expectEnd("Sync request")
            try await syncUpstream()
            let reply = report(for: leecher, includeLayout: epoch != state.withLock { $0.layoutEpoch })
            let encoded = DirtyReportCodec.parts(epoch: reply.layoutEpoch, layout: reply.layout, dirty: reply.dirty,
                                                 rate: reply.dirtyPagesPerSecond, freeze: 0)
            for part in encoded.dropLast() { try await parts.send(part) }
            return encoded.last!
        case .finalize:
            let final = try await finalize(leecher)
            let reply = report(for: leecher, includeLayout: true)
            let encoded = DirtyReportCodec.parts(epoch: reply.layoutEpoch, layout: reply.layout, dirty: reply.dirty,
                                                 rate: 0, freeze: final.freezeMicroseconds)
            for part in encoded.dropLast() { try await parts.send(part) }
            return encoded.last!
        case .checksum:
            return try await checksum(payload)
        case .complete:
            guard state.withLock({ $0.finalized != nil }) else {
                throw RPCError(code: .badRequest, message: "Complete needs a finalized migration; call Finalize first")
            }
            leecher.state.withLock { $0.completed = true }
            await maybeCompleteUpstream()
            let said = state.withLock { s -> String in
                if let done = s.upstreamCompleted { return done }
                if let failure = s.upstreamFailure {
                    return "image served from the hub's cache; the source was not told (\(failure))"
                }
                return "the hub will complete the source once every leecher has"
            }
            return OutcomeReply(message: said).encode()
        case .abort:
            leecher.state.withLock { $0.attached = false }
            await leecherGone(leecher)
            return OutcomeReply(message: leftMessage()).encode()
        case .hello, .track:
            throw RPCError(code: .badRequest, message: "\(method) was already answered on this connection")
        }
    }

    /// The answer to a leecher's Abort: what becomes of the source.
    private func leftMessage() -> String {
        state.withLock { s in
            let others = s.leechers.count
            if let said = s.upstreamAborted {
                return "left migration '\(name)' as the last leecher after the freeze, so the hub told the seeder to abort; the seeder said: \(said)"
            }
            if let done = s.upstreamCompleted {
                return "left migration '\(name)', which the other leechers completed: \(done)"
            }
            if let failure = s.upstreamFailure {
                return "left migration '\(name)'; \(failure) (a seeder left alone thaws the source after its grace period)"
            }
            if s.finalized != nil {
                return "left migration '\(name)'; the source stays frozen for the \(others) other leecher(s)"
            }
            return others > 0
                ? "left migration '\(name)' before the freeze; the source runs on, tracked for the \(others) other leecher(s)"
                : "left migration '\(name)' before the freeze; the source runs on (the hub keeps tracking it for leechers to come)"
        }
    }

    private func readAt(_ request: ReadRequest, _ parts: RPCPartWriter, _ leecher: HubLeecher,
                        urgent: Bool = false) async throws {
        let covered = state.withLock { s in s.layout.filter { $0.kind == .migrate }.map(\.range) }
        var pages: [UInt64] = []
        for range in request.ranges {
            var page = range.start
            while page < range.end {
                pages.append(page)
                page += pageSize
            }
        }
        let mapped = pages.filter { page in covered.contains { $0.contains(page) } }
        let missed = try await ensureCached(mapped)
        metrics.servedFromCache(pages: mapped.count - missed)
        // Pages outside the layout are answered unmapped: a copy cached
        // there is of memory that is gone (the leecher learns the layout
        // from its next Sync).
        let inLayout = Set(mapped)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: MigrationLimits.pagesPerPart * Int(pageSize),
                                                           alignment: Int(pageSize))
        defer { buffer.deallocate() }
        var index = 0
        while index < pages.count {
            let chunk = Array(pages[index..<min(pages.count, index + MigrationLimits.pagesPerPart)])
            index += chunk.count
            var ranges: [AddressRange] = []
            var unmapped: [AddressRange] = []
            var holes: [AddressRange] = []
            var sentVersions: [(UInt64, UInt32)] = []
            try cacheLock.withLock { _ in
                for (i, page) in chunk.enumerated() {
                    let destination = buffer.baseAddress! + i * Int(pageSize)
                    if inLayout.contains(page), let entry = cache.entry(page) {
                        if try !cache.load(entry, into: destination) { memset(destination, 0, Int(pageSize)) }
                        if entry.hole { holes.append(AddressRange(start: page, end: page + pageSize)) }
                        if options.tamper?.alterPage == page {
                            destination.storeBytes(of: destination.load(as: UInt8.self) ^ 0xFF, as: UInt8.self)
                        }
                        sentVersions.append((page, entry.version))
                    } else {
                        memset(destination, 0, Int(pageSize))
                        unmapped.append(AddressRange(start: page, end: page + pageSize))
                    }
                    if let last = ranges.last, last.end == page {
                        ranges[ranges.count - 1].end = page + pageSize
                    } else {
                        ranges.append(AddressRange(start: page, end: page + pageSize))
                    }
                }
            }
            let resent = leecher.state.withLock { l -> Int in
                var again = 0
                for (page, version) in sentVersions {
                    if l.sent[page] != nil { again += 1 }
                    l.sent[page] = version
                }
                return again
            }
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[..<(chunk.count * Int(pageSize))])
            let part = PagePart.build(ranges: ranges, data: bytes, unmapped: unmapped, holes: holes)
            metrics.sent(pages: sentVersions.count, bytes: part.count, resent: resent)
            // The cap: bulk waits, a touch only charges (no lock is held here).
            if let pacer = options.pacer {
                if urgent { pacer.charge(part.count) } else { try await pacer.pace(part.count) }
            }
            try await parts.send(part)
        }
    }

    /// The leecher's dirty set: pages it holds at an older version than the current one.
    private func report(for leecher: HubLeecher, includeLayout: Bool) -> SyncReply {
        let (versions, layout, epoch) = state.withLock { ($0.versions, $0.layout, $0.layoutEpoch) }
        var dirtyPages: [UInt64] = []
        // Only pages written since the hub started have a version other than
        // 0 (versions are never dropped), so they are all that can differ.
        leecher.state.withLock { l in
            for (page, version) in versions where l.sent[page].map({ $0 != version }) ?? false { dirtyPages.append(page) }
        }
        dirtyPages.sort()
        var dirty: [AddressRange] = []
        for page in dirtyPages {
            if let last = dirty.last, last.end == page {
                dirty[dirty.count - 1].end = page + pageSize
            } else {
                dirty.append(AddressRange(start: page, end: page + pageSize))
            }
        }
        return SyncReply(layoutEpoch: epoch, layout: includeLayout ? layout : nil, dirty: dirty, dirtyPagesPerSecond: 0)
    }

    // MARK: Finalize and complete

    private func finalize(_ leecher: HubLeecher) async throws -> FinalizeReply {
        leecher.state.withLock { $0.ready = true }
        maybeFinalize()
        while true {
            let (task, failure) = state.withLock { ($0.finalizing, $0.upstreamFailure) }
            if let task {
                do {
                    return try await task.value
                } catch {
                    throw upstreamFailed(error)
                }
            }
            if let failure { throw RPCError(code: .unavailable, message: failure) }
            // While waiting for the others, keep an eye on the source: a lost
            // upstream must fail this leecher, not leave it waiting forever.
            try await syncUpstream()
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    func operatorFinalize() {
        state.withLock { $0.operatorSaidFinalize = true }
        maybeFinalize()
    }

    /// Starts the upstream Finalize when the policy is met.
    private func maybeFinalize() {
        let (start, ready, attached) = state.withLock { s -> (Bool, Int, Int) in
            guard s.finalizing == nil, s.info != nil else { return (false, 0, 0) }
            let ready = s.leechers.filter { $0.state.withLock { $0.ready } }.count
            let attached = s.leechers.count
            let go: Bool
            switch options.finalize {
            case .first: go = ready > 0
            case .whenAllReady: go = ready > 0 && ready == attached
            case .manual: go = s.operatorSaidFinalize
            }
            if go {
                let syncing = s.syncing
                s.finalizing = Task { [link] in
                    // A Sync in flight was answered before the freeze: its
                    // report (a layout, at least) comes first.
                    _ = try? await syncing?.value
                    let asked = ContinuousClock.now
                    let parts = try await link.callParts(.finalize, [])
                    let report = try DirtyReportCodec.decode(parts)
                    self.applyUpstreamReport(epoch: report.epoch, layout: report.layout, dirty: report.dirty)
                    let reply = FinalizeReply(layoutEpoch: report.epoch, layout: report.layout ?? [],
                                              dirty: report.dirty, freezeMicroseconds: report.freeze)
                    self.state.withLock { s in
                        s.finalized = reply
                        s.phase = .frozen
                    }
                    self.metrics.entered(.frozen)
                    self.metrics.finalized(downtime: .now - asked, freezeMicroseconds: report.freeze)
                    self.events(.finalized(migration: self.name, freezeMilliseconds: Double(report.freeze) / 1000,
                                           dirtyPages: report.dirty.reduce(0) { $0 + $1.pageCount }))
                    self.startFill()
                    return reply
                }
            }
            return (go, ready, attached)
        }
        if !start && options.finalize != .first && ready > 0 {
            events(.waitingToFinalize(ready: ready, attached: attached))
        }
    }

    /// After the freeze, pulls every page not yet cached, so the hub can
    /// serve late leechers and outlive its upstream.
    private func startFill() {
        let task = Task {
            let layout = self.state.withLock { $0.layout }
            for region in layout where region.kind == .migrate {
                var start = region.start
                while start < region.end {
                    let end = min(region.end, start + UInt64(MigrationLimits.maxPagesPerRead) * pageSize)
                    var pages: [UInt64] = []
                    var page = start
                    while page < end {
                        pages.append(page)
                        page += pageSize
                    }
                    do { try await self.ensureCached(pages) } catch { return }
                    start = end
                }
            }
            let ranges = layout.filter { $0.kind == .migrate }.map(\.range)
            var w = WireWriter()
            w.ranges(ranges)
            _ = try? await self.checksum(w.bytes)
        }
        state.withLock { $0.filling = task }
    }

    private func checksum(_ payload: [UInt8]) async throws -> [UInt8] {
        var reader = WireReader(payload)
        let ranges = try reader.ranges()
        try reader.expectEnd("Checksum request")
        if options.tamper?.forgeChecksums == true { return try forgedChecksums(ranges) }
        let link = self.link
        let call = state.withLock { s in
            if let known = s.checksums[ranges] { return known }
            let call = Task { try await link.call(.checksum, payload) }
            s.checksums[ranges] = call
            return call
        }
        do {
            return try await call.value
        } catch {
            // Not cached: a later asker tries again (through a resumed upstream).
            state.withLock { s in
                if s.checksums[ranges] == call { s.checksums[ranges] = nil }
            }
            throw upstreamFailed(error)
        }
    }

    /// Test-only (`HubTamper.forgeChecksums`): digests of what this hub
    /// serves, unsigned, as a hub posing as the source would answer.
    private func forgedChecksums(_ ranges: [AddressRange]) throws -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(pageSize), alignment: Int(pageSize))
        defer { buffer.deallocate() }
        var digests: [[UInt8]] = []
        for range in ranges {
            var hasher = Blake2b256()
            var page = range.start
            while page < range.end {
                let held = try cacheLock.withLock { _ in
                    try cache.entry(page).map { try cache.load($0, into: buffer.baseAddress!) } ?? false
                }
                if !held { memset(buffer.baseAddress!, 0, Int(pageSize)) }
                if options.tamper?.alterPage == page { buffer[0] ^= 0xFF }
                hasher.update(UnsafeRawBufferPointer(buffer))
                page += pageSize
            }
            digests.append(hasher.finish())
        }
        return ChecksumReply(digests: digests).encode()
    }

    /// After the freeze: completes upstream once every leecher on the list
    /// has completed and the cache holds the whole frozen image; aborts it
    /// (the source thaws) when no leecher is left and none completed, since
    /// nobody holds the image then.
    private func maybeCompleteUpstream() async {
        enum End { case complete, abort }
        let (end, filling) = state.withLock { s -> (End?, Task<Void, Never>?) in
            guard s.finalized != nil, s.upstreamCompleted == nil, s.upstreamFailure == nil,
                  s.abandoned == nil else { return (nil, nil) }
            if s.leechers.isEmpty {
                s.abandoned = "migration '\(name)' was abandoned: every leecher left after the freeze, so the hub told the seeder to abort (the source thaws and runs on); start a new migration"
                return (.abort, nil)
            }
            let allDone = !s.completing && s.leechers.allSatisfy { $0.state.withLock { $0.completed } }
            if allDone { s.completing = true }
            return (allDone ? .complete : nil, s.filling)
        }
        switch end {
        case nil:
            return
        case .abort:
            let said = (try? OutcomeReply.decode(try await link.call(.abort, [])).message)
                ?? "the seeder did not answer; it thaws the source itself after its grace period"
            state.withLock { $0.upstreamAborted = said }
            metrics.entered(.aborted)
            metrics.error(.aborted)
            events(.abandoned(migration: name, message: said))
            await link.close()
            return
        case .complete:
            break
        }
        await filling?.value
        do {
            let said = try OutcomeReply.decode(try await link.call(.complete, [])).message
            let first = state.withLock { s -> Bool in
                defer { s.upstreamCompleted = said }
                return s.upstreamCompleted == nil
            }
            if first {
                metrics.entered(.completed)
                events(.completed(migration: name, message: said))
            }
            await link.close()
        } catch {
            _ = upstreamFailed(error)
        }
    }
}
