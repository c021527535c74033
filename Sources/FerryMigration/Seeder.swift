// The seeder's side of a migration: one session per process, owned by one
// leecher connection at a time, kept across dropped connections for a grace
// period so the leecher can resume. The session keeps, for every page, whether
// it was sent and whether it was written since; that makes the dirty set
// "written since last sent" and lets any reply be asked for again.
//
// This file holds the session and its connections; SeederRequests.swift
// answers the protocol's methods (MigrationServer), SeederReadAt.swift streams
// pages, and SeederFreeze.swift scans, freezes and hashes.
import Foundation
import FerryToolkit
import Synchronization

public struct SeederOptions: Sendable {
    public var then: ThenAction = .stop
    /// How long a session outlives its connection before the seeder gives up
    /// (and thaws a frozen process).
    public var grace: Duration = .seconds(5)
    public var host: String = ProcessInfo.processInfo.hostName
    /// The name leechers (and hubs) ask for; empty accepts any.
    public var migration: String = ""
    /// Signs Checksum replies, so leechers can pin this seeder's key through
    /// hubs (`leecher pull --seeder-key`); nil sends them unsigned.
    public var signingKey: KeyPair? = nil
    /// The bandwidth cap (`--max-bandwidth`): bulk ReadAt parts wait on it
    /// before they are sent; a companion connection's (post-copy touches)
    /// only charge it. Nil: no cap.
    public var pacer: Pacer? = nil
    /// Issue 13 hook: methods beyond the migration protocol (CRIU's images,
    /// CriuSource.swift), answered to the session's owner. Nil: none.
    public var extraMethods: (any SeederExtraMethods)? = nil

    public init(then: ThenAction = .stop, grace: Duration = .seconds(5), migration: String = "") {
        self.then = then
        self.grace = grace
        self.migration = migration
    }
}

/// What the seeder reports to its command line.
public enum SeederEvent: Sendable {
    case connected(peer: String)
    case tracking(regions: Int, migratePages: UInt64, tracker: String)
    case resumed(peer: String, phase: SessionPhase)
    case disconnected(peer: String, reason: String)
    case finalized(freezeMilliseconds: Double, dirtyPages: UInt64)
    case refused(peer: String, reason: String)
}

/// How a served migration ended.
public enum SeederOutcome: Sendable, Equatable {
    case completed(String)
    case aborted(String)
}

public final class SeederService: MigrationServer, Sendable {
    public let source: any MemorySource
    public let options: SeederOptions
    let events: @Sendable (SeederEvent) -> Void
    /// Counters for `--metrics` (Metrics.swift); `metricGauges` reads the rest.
    public let metrics = MigrationMetrics(role: .seeder)

    struct State {
        var phase: SessionPhase? = nil
        var session: [UInt8] = []
        /// Increases each time a connection takes the session; a grace timer
        /// only fires if no connection took it since.
        var owner = 0
        var ownerAlive = false
        var store = PageStore(layout: [])
        var layout: [Region] = [] {
            didSet {
                migrated = Ranges.merge(layout.filter { $0.kind == .migrate }.map(\.range))
                hugePages = MigrationLimits.wholeHugePages(in: layout)
            }
        }
        /// Hugetlb regions whose huge pages a part holds whole (ReadAt).
        var hugePages: [Region] = []
        /// The migratable ranges of `layout`, merged: all that ReadAt and
        /// Checksum may read.
        var migrated: [AddressRange] = []
        var layoutEpoch: UInt64 = 1
        var finalized: FinalizeReply? = nil
        /// Wall-clock time of the freeze, Unix milliseconds (signed with the checksums).
        var frozenAtMilliseconds: UInt64 = 0
        var outcome: SeederOutcome? = nil
        /// Completed, and the owner's last connection failed rather than
        /// hung up: the leecher may not have the Complete reply (see `drain`).
        var completionUnconfirmed = false
        var dirtyRate = RateMeter(window: .seconds(3))
        var pagesSent: UInt64 = 0
    }

    let state = Mutex(State())
    /// Held shared across re-arm + read + mark-sent of each part, alone
    /// across scan + merge (then `state` inside it): what makes "written since
    /// last sent" exact, while reads for several requests run at once.
    let reading = ReadWriteLock()
    /// Bulk part reads under way. Each runs on a thread of its own, but no
    /// more than one per core at once, as when they ran on the cooperative
    /// pool: Finalize takes `reading` alone and waits for every read holding
    /// it, so it waits for at most that many, not for every request in flight.
    let bulkReads = ConditionLock(0)
    static let bulkReadLimit = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    private let openConnections = Atomic<Int>(0)
    /// The transports being served, so an abandoned migration can hang up on them.
    private let transports = Mutex<[ObjectIdentifier: FrameTransport]>([:])

    /// Connections being served now.
    public var connectionCount: Int { openConnections.load(ordering: .relaxed) }

    /// After the outcome: waits (at most `limit`) for the leecher to close its
    /// connection, so the last reply is delivered before the process exits.
    /// Then, if the session completed but its leecher's connection failed
    /// (it did not hang up in order), waits up to the grace period more for
    /// the leecher to resume: the Complete reply may have been lost with the
    /// connection, and only a resumed session tells the leecher that the
    /// source is now its to own. Exiting at once made that leecher fail and
    /// drop a verified image while the source was left stopped (or killed,
    /// with `--then kill`): the fault matrix's "link cut in Complete" cell.
    /// Keep the listener open until this returns.
    public func drain(limit: Duration = .seconds(2)) async {
        let deadline = ContinuousClock.now + limit
        while connectionCount > 0 && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(10))
        }
        let resumeDeadline = ContinuousClock.now + options.grace
        while connectionCount > 0 || state.withLock({ $0.completionUnconfirmed }),
              ContinuousClock.now < resumeDeadline {
            try? await Task.sleep(for: .milliseconds(10))
        }
    }
    private let outcomeStream: AsyncStream<SeederOutcome>
    private let outcomeContinuation: AsyncStream<SeederOutcome>.Continuation

    public init(source: any MemorySource, options: SeederOptions = .init(),
                events: @escaping @Sendable (SeederEvent) -> Void = { _ in }) {
        self.source = source
        self.options = options
        self.events = events
        (outcomeStream, outcomeContinuation) = AsyncStream.makeStream(of: SeederOutcome.self)
    }

    /// Waits until the migration completed or was aborted.
    public func outcome() async -> SeederOutcome {
        for await outcome in outcomeStream { return outcome }
        return state.withLock { $0.outcome } ?? .aborted("the seeder stopped")
    }

    public var pagesSent: UInt64 { state.withLock { $0.pagesSent } }

    /// The state `--metrics` shows: this process's migration phase, and
    /// whether its leecher is connected.
    public var metricGauges: MigrationMetrics.Gauges {
        state.withLock { s in
            var gauges = MigrationMetrics.Gauges()
            if let phase = s.phase { gauges.migrationsByPhase[phase] = 1 }
            gauges.leechersConnected = s.ownerAlive && s.outcome == nil ? 1 : 0
            return gauges
        }
    }

    /// True once the migration completed or was aborted.
    public var isFinished: Bool { state.withLock { $0.outcome != nil } }

    /// Serves one authenticated connection until it ends.
    public func serve(_ transport: FrameTransport) async {
        openConnections.add(1, ordering: .relaxed)
        transports.withLock { $0[ObjectIdentifier(transport)] = transport }
        defer {
            transports.withLock { $0[ObjectIdentifier(transport)] = nil }
            openConnections.subtract(1, ordering: .relaxed)
        }
        await answer(transport)
    }

    /// Serves through a hub the seeder dials (`--via`, for NAT): keeps one
    /// connection open until the migration ends, dialing again with backoff
    /// whenever it drops. The hub calls; the seeder still only answers.
    public func dialOut(connect: @escaping @Sendable () async throws -> FrameTransport,
                        failed: @escaping @Sendable (String) -> Void = { _ in }) async {
        var delay: Duration = .milliseconds(100)
        while !isFinished {
            do {
                let channel = try await connect()
                delay = .milliseconds(100)
                await serve(channel)
            } catch {
                failed("\(error)")
            }
            if isFinished { return }
            try? await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(2))
        }
    }

    func connectionEnded(_ connection: SeederConnection, peer: String, reason: String, inOrder: Bool) {
        let owner = connection.owner.load(ordering: .acquiring)
        guard owner != 0 else { return }
        let waiting = state.withLock { s -> Bool in
            if s.owner == owner, case .completed = s.outcome {
                s.completionUnconfirmed = !inOrder
                return !inOrder
            }
            guard s.owner == owner, s.outcome == nil else { return false }
            s.ownerAlive = false
            return true
        }
        guard waiting else { return }
        metrics.error(.connectionLost)
        events(.disconnected(peer: peer, reason: reason))
        let grace = options.grace
        Task {
            try? await Task.sleep(for: grace)
            let expired = self.state.withLock { s in s.owner == owner && !s.ownerAlive && s.outcome == nil }
            guard expired else { return }
            // Thawing stops the process's threads through the ptrace thread: not on the pool.
            let reason = "the leecher was gone for longer than the grace period (\(grace))"
            if (try? await runOnDedicatedThread(for: "the release of pid \(self.source.pid)", { self.abandon(reason) })) == nil {
                self.abandon(reason)
            }
        }
    }

    /// Ends the session: applies `then` on success, or thaws and lets go on abort.
    func finish(_ outcome: SeederOutcome, abort: Bool) {
        let first = state.withLock { s -> Bool in
            guard s.outcome == nil else { return false }
            s.outcome = outcome
            s.phase = abort ? .aborted : .completed
            // The owning connection was lost while Complete was being applied
            // (before the outcome was set, so `connectionEnded` took it for a
            // live session's): the reply cannot have reached the leecher.
            if !abort && !s.ownerAlive { s.completionUnconfirmed = true }
            return true
        }
        guard first else { return }
        metrics.entered(abort ? .aborted : .completed)
        if abort { metrics.error(.aborted) }
        outcomeContinuation.yield(outcome)
        outcomeContinuation.finish()
    }

    /// Lets go of the process for an outcome decided elsewhere (a signal, a
    /// fatal error): a frozen process is thawed, tracking removed.
    public func abandon(_ reason: String) {
        let open = state.withLock { $0.outcome == nil && $0.phase != nil }
        if open { try? source.release(then: .resume) }
        finish(.aborted(reason), abort: true)
        // Nothing is served after an abandon: hang up, so callers learn it now.
        for transport in transports.withLock({ Array($0.values) }) { transport.close() }
    }
}

/// Per-connection facts the seeder's handlers need.
final class SeederConnection: MigrationConnection {
    /// The owner number this connection holds, 0 until Track.
    let owner = Atomic<Int>(0)
    /// A companion connection of the session: priority ReadAt only.
    let companion = Atomic<Bool>(false)
    /// What this connection's ReadAt requests may hold at once.
    let readBudget = ByteBudget(bytes: MigrationLimits.readBudgetPerConnection)

    var isCompanion: Bool { companion.load(ordering: .acquiring) }
}
