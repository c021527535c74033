// The star hub: leechers call it exactly as they would call a seeder; it
// pulls each page once from upstream (a seeder, or another hub) and serves
// every leecher from its cache. HubService routes: it keeps the relayed
// migrations by name, takes in seeders that dial in, and sends each leecher
// connection's requests to its migration (HubMigration), whose upstream
// session (HubUpstream) owns the pages and whose leecher sessions
// (HubLeecher) know what each leecher holds.
import Foundation
import Synchronization

/// Relays migrations from upstream seeders to many leechers.
public final class HubService: MigrationServer, Sendable {
    public let options: HubOptions
    private let events: @Sendable (HubEvent) -> Void
    private let hooks: HubTestHooks
    /// Counters for `--metrics` (Metrics.swift); `metricGauges` reads the rest.
    public let metrics = MigrationMetrics(role: .hub)
    private let migrations = Mutex<[String: HubMigration]>([:])

    /// Seeders that dialed in (`seeder serve --via`), by migration name, for
    /// the upstream link to take (first connection and reconnections), and
    /// the arrival each waiting link waits for.
    private struct DialedIn {
        var waiting: [String: [(RPCClient, String)]] = [:]
        var arrivals: [String: Latch<Void>] = [:]
    }
    private let dialedIn = Mutex(DialedIn())

    public convenience init(options: HubOptions = .init(), events: @escaping @Sendable (HubEvent) -> Void = { _ in }) {
        self.init(options: options, testHooks: HubTestHooks(), events: events)
    }

    /// A hub with test doubles (tests only).
    init(options: HubOptions, testHooks: HubTestHooks, events: @escaping @Sendable (HubEvent) -> Void) {
        self.options = options
        self.events = events
        hooks = testHooks
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
        register(name, link: SessionLink(migration: wanted, connect: connect))
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
        let arrival = dialedIn.withLock { d -> Latch<Void>? in
            d.waiting[name, default: []].append((client, transport.peerDescription))
            return d.arrivals.removeValue(forKey: name)
        }
        arrival?.set(())
        let known = migrations.withLock { $0[name] != nil }
        if !known {
            register(name, link: SessionLink(migration: "", connectClient: { [self] in try await self.takeDialedIn(name) }))
            events(.upstream(migration: name, pid: hello.pid, host: hello.host))
        }
    }

    /// The next connection the seeder of `name` dialed in with, waiting for
    /// one at most the grace period.
    private func takeDialedIn(_ name: String) async throws -> (RPCClient, String) {
        let deadline = ContinuousClock.now + options.grace
        while true {
            let (waiting, arrival) = dialedIn.withLock { d -> ((RPCClient, String)?, Latch<Void>) in
                if let queue = d.waiting[name], let first = queue.first {
                    d.waiting[name] = Array(queue.dropFirst())
                    return (first, Latch())
                }
                let arrival = d.arrivals[name] ?? Latch()
                d.arrivals[name] = arrival
                return (nil, arrival)
            }
            if let waiting { return waiting }
            let left = deadline - .now
            guard left > .zero else { break }
            _ = await arrival.wait(limit: left)
            try Task.checkCancellation()
        }
        throw MigrationError.connectionLost("the seeder of migration '\(name)' did not dial in again within \(options.grace)")
    }

    private func register(_ name: String, link: SessionLink) {
        let migration = HubMigration(name: name, link: link, options: options, hooks: hooks, events: events, metrics: metrics)
        migrations.withLock { $0[name] = migration }
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

    /// Waits until a migration is frozen and its whole frozen image is
    /// cached (or `limit` passes); true when it is. Tests and benchmarks use
    /// it to cut the upstream at a known point.
    func waitUntilFilled(_ name: String, limit: Duration = .seconds(30)) async -> Bool {
        guard let migration = migrations.withLock({ $0[name] }) else { return false }
        return await migration.upstream.waitUntilFilled(limit: limit)
    }

    /// The operator's finalize, for `--finalize manual`.
    public func finalizeNow() {
        for migration in migrations.withLock({ Array($0.values) }) { migration.operatorFinalize() }
    }

    /// Serves one authenticated leecher connection until it ends.
    public func serve(_ transport: FrameTransport) async {
        await answer(transport)
    }

    // MARK: MigrationServer: MigrationDispatcher decodes, checks and calls these.

    var role: String { "hub" }
    var companionRule: String { "a companion connection may only ReadAt" }

    func makeConnection(peer: String) -> HubConnection { HubConnection(peer: peer) }

    func connectionEnded(_ connection: HubConnection, peer: String, reason: String, inOrder: Bool) {
        guard !connection.isCompanion, let session = connection.binding.withLock({ $0 }) else { return }
        // A leecher that completed, or left with Abort, ended its session itself.
        if session.migration.leftUnfinished(session.leecher) { metrics.error(.connectionLost) }
        session.migration.leecherDisconnected(session.leecher)
        events(.leecherLeft(peer: peer, reason: reason))
    }

    func hello() -> HelloReply {
        let all = migrations.withLock { Array($0.values) }
        return HelloReply(migration: all.count == 1 ? all[0].name : "", pid: 0, host: options.host, phase: nil)
    }

    func track(_ request: TrackRequest, on connection: HubConnection) async throws -> TrackReply {
        let migration = try self.migration(named: request.migration)
        let (leecher, reply) = try await migration.track(request)
        connection.binding.withLock { $0 = HubSession(migration: migration, leecher: leecher) }
        connection.companion.store(request.companion, ordering: .releasing)
        events(.leecherJoined(peer: connection.peer, migration: migration.name))
        return reply
    }

    func session(of connection: HubConnection, companion: Bool) throws -> HubSession {
        guard let session = connection.binding.withLock({ $0 }) else {
            throw RPCError(code: .badRequest, message: "call Track first")
        }
        return session
    }

    func readAt(_ request: ReadRequest, parts: RPCPartWriter, for session: HubSession, urgent: Bool) async throws {
        try await session.leecher.readAt(request, parts, urgent: urgent)
    }

    func sync(knownEpoch: UInt64, for session: HubSession) async throws -> SyncReply {
        try await session.migration.sync(knownEpoch: knownEpoch, for: session.leecher)
    }

    func finalize(for session: HubSession) async throws -> FinalizeReply {
        try await session.migration.finalize(for: session.leecher)
    }

    func checksum(_ ranges: [AddressRange], for session: HubSession) async throws -> ChecksumReply {
        try await session.migration.checksum(ranges)
    }

    func complete(for session: HubSession) async throws -> OutcomeReply {
        try await session.migration.complete(for: session.leecher)
    }

    func abort(for session: HubSession) async throws -> OutcomeReply {
        await session.migration.abort(for: session.leecher)
    }

    /// The migration a Track names; the only one when it names none.
    private func migration(named wanted: String) throws -> HubMigration {
        let all = migrations.withLock { $0 }
        if wanted.isEmpty {
            guard all.count == 1, let only = all.values.first else {
                throw RPCError(code: .badRequest, message: all.isEmpty
                    ? "this hub relays no migration yet: start the seeder (or its --via) first"
                    : "this hub relays \(all.count) migrations (\(all.keys.sorted().joined(separator: ", "))): name one with --migration")
            }
            return only
        }
        guard let named = all[wanted] else {
            throw RPCError(code: .badRequest,
                           message: "this hub relays no migration named '\(wanted)'; it has: \(all.keys.sorted().joined(separator: ", "))")
        }
        return named
    }
}

/// What a leecher connection speaks for once it called Track.
struct HubSession: Sendable {
    let migration: HubMigration
    let leecher: HubLeecher
}

/// One leecher connection to the hub.
final class HubConnection: MigrationConnection {
    let peer: String
    let binding = Mutex<HubSession?>(nil)
    /// A companion connection: priority ReadAt for a session another connection owns.
    let companion = Atomic<Bool>(false)
    var isCompanion: Bool { companion.load(ordering: .acquiring) }
    init(peer: String) { self.peer = peer }
}
