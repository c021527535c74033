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
public final class HubService: Sendable {
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
            if migration.leftUnfinished(leecher) { metrics.error(.connectionLost) }
            migration.leecherDisconnected(leecher)
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
            let migration = try self.migration(named: request.migration)
            let (leecher, reply) = try await migration.track(request, peer: connection.peer)
            connection.binding.withLock { $0 = (migration, leecher) }
            connection.companion.store(request.companion, ordering: .releasing)
            events(.leecherJoined(peer: connection.peer, migration: migration.name))
            return reply.encode()
        default:
            let companion = connection.companion.load(ordering: .acquiring)
            if companion && known != .readAt {
                throw RPCError(code: .badRequest, message: "a companion connection may only ReadAt")
            }
            guard let (migration, leecher) = connection.binding.withLock({ $0 }) else {
                throw RPCError(code: .badRequest, message: "call Track first")
            }
            return try await migration.handle(known, payload, parts, leecher, urgent: companion)
        }
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

/// Which migration and leecher session a connection speaks for.
final class HubConnection: Sendable {
    let peer: String
    let binding = Mutex<(HubMigration, HubLeecher)?>(nil)
    /// A companion connection: priority ReadAt for a session another connection owns.
    let companion = Atomic<Bool>(false)
    init(peer: String) { self.peer = peer }
}
