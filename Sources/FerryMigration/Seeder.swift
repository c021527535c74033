// The seeder's side of a migration: one session per process, owned by one
// leecher connection at a time, kept across dropped connections for a grace
// period so the leecher can resume. The session keeps, for every page, whether
// it was sent and whether it was written since; that makes the dirty set
// "written since last sent" and lets any reply be asked for again.
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

public final class SeederService: Sendable {
    public let source: any MemorySource
    public let options: SeederOptions
    private let events: @Sendable (SeederEvent) -> Void
    /// Counters for `--metrics` (Metrics.swift); `metricGauges` reads the rest.
    public let metrics = MigrationMetrics(role: .seeder)

    private struct State {
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
        var dirtyRate = RateMeter()
        var pagesSent: UInt64 = 0
    }

    private let state = Mutex(State())
    /// Held shared across re-arm + read + mark-sent of each part, alone
    /// across scan + merge (then `state` inside it): what makes "written since
    /// last sent" exact, while reads for several requests run at once.
    private let reading = ReadWriteLock()
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
        let connection = Connection()
        metrics.connected()
        let end = await answerRPCs(on: transport) { [self] method, payload, parts in
            do {
                return try await self.handle(method, payload, parts, connection)
            } catch {
                metrics.error(.request)
                throw error
            }
        }
        connectionEnded(connection, peer: transport.peerDescription, reason: end.reason, inOrder: end.inOrder)
    }

    /// Serves through a hub the seeder dials (`--via`, for NAT): keeps one
    /// connection open until the migration ends, dialing again with backoff
    /// whenever it drops. The hub calls; the seeder still only answers.
    public func dialOut(connect: @escaping @Sendable () async throws -> FrameTransport,
                        failed: @escaping @Sendable (String) -> Void = { _ in }) async {
        var delay = 0.1
        while !isFinished {
            do {
                let channel = try await connect()
                delay = 0.1
                await serve(channel)
            } catch {
                failed("\(error)")
            }
            if isFinished { return }
            try? await Task.sleep(for: .milliseconds(Int(delay * 1000)))
            delay = min(delay * 2, 2)
        }
    }

    /// Per-connection facts the handler needs.
    private final class Connection: Sendable {
        /// The owner number this connection holds, 0 until Track.
        let owner = Atomic<Int>(0)
        /// A companion connection of the session: priority ReadAt only.
        let companion = Atomic<Bool>(false)
        /// What this connection's ReadAt requests may hold at once.
        let readBudget = ByteBudget(bytes: MigrationLimits.readBudgetPerConnection)
    }

    private func connectionEnded(_ connection: Connection, peer: String, reason: String, inOrder: Bool) {
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
            if expired {
                self.abandon("the leecher was gone for longer than the grace period (\(grace))")
            }
        }
    }

    /// Ends the session: applies `then` on success, or thaws and lets go on abort.
    private func finish(_ outcome: SeederOutcome, abort: Bool) {
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

    // MARK: - Requests

    private func handle(_ method: UInt16, _ payload: [UInt8], _ parts: RPCPartWriter,
                        _ connection: Connection) async throws -> [UInt8] {
        guard let known = MigrationMethod(rawValue: method) else {
            // Issue 13 hook: extension methods (CriuSource.swift), owner only.
            if let extra = options.extraMethods, extra.handles(method) {
                try requireOwner(connection)
                let reply = try await extra.handle(method, payload)
                for part in reply.dropLast() { try await parts.send(part) }
                return reply.last ?? []
            }
            throw RPCError(code: .unknownMethod, message: "unknown method 0x\(String(method, radix: 16))")
        }
        if known == .hello {
            let phase = state.withLock { $0.phase }
            return HelloReply(migration: options.migration, pid: source.pid, host: options.host, phase: phase).encode()
        }
        if known == .track {
            return try track(TrackRequest.decode(payload), connection)
        }
        if connection.companion.load(ordering: .acquiring) {
            let phase = state.withLock { $0.phase }
            guard known == .readAt, phase == .tracking || phase == .frozen else {
                throw RPCError(code: .badRequest, message: "a companion connection may only ReadAt while the migration runs")
            }
        } else {
            try requireOwner(connection)
        }
        switch known {
        case .track, .hello:
            throw RPCError(code: .internalError, message: "unreachable: \(known) is handled before the owner check")
        case .readAt:
            let request = try ReadRequest.decode(payload)
            let huge = state.withLock { s in
                s.hugePages.filter { region in request.ranges.contains { $0.start < region.end && region.start < $0.end } }
            }
            try await connection.readBudget.withBytes(huge.isEmpty ? MigrationLimits.readAtHolds : MigrationLimits.hugeReadAtHolds) {
                try await readAt(request, huge: huge, parts,
                                 urgent: connection.companion.load(ordering: .acquiring))
            }
            return []
        case .sync:
            var reader = WireReader(payload)
            let epoch = try reader.u64("layout epoch")
            try reader.expectEnd("Sync request")
            let reply = try sync(knownEpoch: epoch)
            let encoded = DirtyReportCodec.parts(epoch: reply.layoutEpoch, layout: reply.layout, dirty: reply.dirty,
                                                 rate: reply.dirtyPagesPerSecond, freeze: 0)
            for part in encoded.dropLast() { try await parts.send(part) }
            return encoded.last!
        case .finalize:
            let reply = try finalize()
            let encoded = DirtyReportCodec.parts(epoch: reply.layoutEpoch, layout: reply.layout, dirty: reply.dirty,
                                                 rate: 0, freeze: reply.freezeMicroseconds)
            for part in encoded.dropLast() { try await parts.send(part) }
            return encoded.last!
        case .checksum:
            var reader = WireReader(payload)
            let ranges = try reader.ranges()
            try reader.expectEnd("Checksum request")
            // Hashing the whole frozen source takes about a second per GiB:
            // not on a Swift concurrency thread, which serves post-copy reads.
            return try await runOnDedicatedThread(for: "the checksums of pid \(source.pid)") { [self] in
                try checksum(ranges).encode()
            }
        case .complete:
            return try complete().encode()
        case .abort:
            return try abortSession().encode()
        }
    }

    private func requireOwner(_ connection: Connection) throws {
        let owner = connection.owner.load(ordering: .acquiring)
        let (current, phase) = state.withLock { ($0.owner, $0.phase) }
        guard owner != 0, owner == current else {
            throw RPCError(code: .badRequest, message: "call Track first: this connection does not own the migration of pid \(source.pid)")
        }
        if phase == .completed || phase == .aborted {
            throw RPCError(code: .badRequest, message: "the migration of pid \(source.pid) has already \(phase!)")
        }
    }

    private func track(_ request: TrackRequest, _ connection: Connection) throws -> [UInt8] {
        guard request.version == MigrationLimits.version else {
            throw RPCError(code: .badRequest,
                           message: "migration protocol version \(request.version) is not supported; this seeder speaks \(MigrationLimits.version)")
        }
        let pid = source.pid
        if !request.migration.isEmpty && !options.migration.isEmpty && request.migration != options.migration {
            throw RPCError(code: .badRequest,
                           message: "this seeder serves migration '\(options.migration)', not '\(request.migration)'")
        }
        let reply = try state.withLock { s -> TrackReply in
            if request.companion {
                guard let phase = s.phase, request.resume == s.session, phase == .tracking || phase == .frozen else {
                    throw RPCError(code: .badRequest, message: "no running migration of pid \(pid) with that session to join")
                }
                connection.companion.store(true, ordering: .releasing)
                return TrackReply(session: s.session, phase: phase, pid: pid, host: options.host,
                                  tracker: source.trackerName, graceMilliseconds: 0,
                                  layoutEpoch: s.layoutEpoch, layout: s.layout)
            }
            switch (s.phase, request.resume) {
            case (nil, nil):
                try source.startTracking()
                s.session = (0..<16).map { _ in UInt8.random(in: 0...255) }
                s.phase = .tracking
                s.layout = source.regions
                s.store = PageStore(layout: s.layout)
                metrics.entered(.tracking)
            case (nil, .some):
                throw RPCError(code: .badRequest, message: "no migration of pid \(pid) to resume: the seeder has no session")
            case (.some(let phase), let resume):
                guard resume == s.session else {
                    throw RPCError(code: .unavailable, message: "pid \(pid) is already being migrated (\(phase)) to another leecher; one migration at a time per process: use a hub to feed several destinations")
                }
                // A completed session still answers its own leecher, whose
                // Complete reply may have been lost with the connection.
                guard phase != .aborted else {
                    throw RPCError(code: .badRequest, message: "the migration of pid \(pid) has already \(phase)")
                }
            }
            if request.resume != nil { metrics.resumed() }
            s.owner += 1
            s.ownerAlive = true
            connection.owner.store(s.owner, ordering: .releasing)
            return TrackReply(session: s.session, phase: s.phase!, pid: pid, host: options.host,
                              tracker: source.trackerName,
                              graceMilliseconds: UInt32(options.grace.components.seconds * 1000
                                  + options.grace.components.attoseconds / 1_000_000_000_000_000),
                              layoutEpoch: s.layoutEpoch, layout: s.layout)
        }
        if request.resume == nil {
            let pages = reply.layout.filter { $0.kind == .migrate }.reduce(0) { $0 + $1.range.pageCount }
            events(.tracking(regions: reply.layout.count, migratePages: pages, tracker: reply.tracker))
        }
        return reply.encode()
    }

    /// Answers ReadAt; `huge` are the hugetlb regions it touches whose huge
    /// pages a part holds whole.
    private func readAt(_ request: ReadRequest, huge: [Region], _ parts: RPCPartWriter,
                        urgent: Bool = false) async throws {
        // Read part by part: each part is re-armed, read and marked sent while
        // holding `reading` shared, so no scan (which holds it alone) can fall
        // between re-arming a page and marking it sent, while reads of
        // several requests run at once. A huge page asked for whole is never
        // split across parts: only a huge page read whole is re-armed.
        let capacity = huge.isEmpty ? MigrationLimits.pagesPerPart : MigrationLimits.hugePagesPerPart
        let buffer = UnsafeMutableRawBufferPointer.allocate(
            byteCount: capacity * Int(pageSize), alignment: Int(pageSize))
        defer { buffer.deallocate() }
        var batch: [AddressRange] = []
        var batchPages = 0
        func flush() async throws {
            guard !batch.isEmpty else { return }
            var resent = 0
            let view = UnsafeMutableRawBufferPointer(rebasing: buffer[..<(batchPages * Int(pageSize))])
            let (vanished, holes) = try reading.shared {
                // Only memory of the migration is read: pages outside the
                // current layout's migratable regions (code, [vdso], anything
                // unmapped since) are answered as unmapped, never read.
                let migrated = state.withLock { $0.migrated }
                let outside = Ranges.subtract(Ranges.merge(batch), migrated)
                let unreadable = outside.isEmpty ? try source.readPages(batch, into: view)
                                                 : try readInside(batch, migrated, into: view)
                let holes = try unbacked(unreadable)
                let fresh = state.withLock { s -> Int in
                    // Pages never sent are remote in the seeder's store; the others were sent before.
                    let remote = s.store.count(.remote)
                    s.store.markSent(batch)
                    s.pagesSent += UInt64(batchPages)
                    return remote - s.store.count(.remote)
                }
                resent = batchPages - fresh
                return (unreadable + outside, holes)
            }
            let part = PagePart.build(ranges: batch, data: UnsafeRawBufferPointer(view), unmapped: vanished,
                                      holes: holes)
            metrics.sent(pages: batchPages, bytes: part.count, resent: resent)
            batch.removeAll(keepingCapacity: true)
            batchPages = 0
            // The cap (no lock is held here): bulk waits, a touch only charges.
            if let pacer = options.pacer {
                if urgent { pacer.charge(part.count) } else { try await pacer.pace(part.count) }
            }
            try await parts.send(part)
        }
        for range in request.ranges {
            var start = range.start
            while start < range.end {
                if let region = huge.first(where: { $0.range.contains(start) }) {
                    let size = region.pageSize
                    if start % size == 0 && start + size <= range.end {
                        // A whole huge page: one unit, in this part if it fits, else in the next.
                        let unit = Int(size / pageSize)
                        if batchPages + unit > capacity { try await flush() }
                        batch.append(AddressRange(start: start, end: start + size))
                        batchPages += unit
                        start += size
                        if batchPages >= MigrationLimits.pagesPerPart { try await flush() }
                        continue
                    }
                }
                let room = max(0, MigrationLimits.pagesPerPart - batchPages)
                // Ordinary pages stop at the next huge page, which is taken whole above.
                var stop = range.end
                if let next = huge.first(where: { $0.end > start && $0.start < range.end }) {
                    let boundary = next.start > start ? next.start : (start + next.pageSize - 1) & ~(next.pageSize - 1)
                    if boundary > start && boundary < stop { stop = boundary }
                }
                let take = min(UInt64(room), (stop - start) / pageSize)
                batch.append(AddressRange(start: start, end: start + take * pageSize))
                batchPages += Int(take)
                start += take * pageSize
                if batchPages >= MigrationLimits.pagesPerPart { try await flush() }
            }
        }
        try await flush()
    }

    /// The parts of `unreadable` that are still mapped as migratable memory:
    /// pages nothing backs (past the end of a file or shared memory object),
    /// where the process itself would get SIGBUS. The rest went away.
    private func unbacked(_ unreadable: [AddressRange]) throws -> [AddressRange] {
        guard !unreadable.isEmpty else { return [] }
        let mapped = Ranges.merge(try ProcessMaps.read(pid: source.pid).filter { $0.kind == .migrate }.map(\.range))
        return Ranges.intersect(Ranges.merge(unreadable), mapped)
    }

    /// Reads the parts of `batch` inside `migrated` to their places in
    /// `buffer`; returns what vanished among them.
    private func readInside(_ batch: [AddressRange], _ migrated: [AddressRange],
                            into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        var vanished: [AddressRange] = []
        var offset = 0
        for range in batch {
            for piece in Ranges.intersect([range], migrated) {
                let at = offset + Int(piece.start - range.start)
                let view = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<(at + Int(piece.length))])
                vanished += try source.readPages([piece], into: view)
            }
            offset += Int(range.length)
        }
        return vanished
    }

    /// Scans, folds the result into the session, and re-reads the layout.
    /// Returns the newly dirty parts of a changed layout; the caller holds the lock.
    private func rescan(_ s: inout State) throws -> Bool {
        // The rate that matters to the leecher: how fast its copies go stale.
        // (Pages never sent, or already stale, are reported again and again
        // by scans that do not re-arm; they change nothing.)
        let stale = s.store.markDirty(try source.scanWrittenSinceRead())
        s.dirtyRate.add(UInt64(stale))
        metrics.foundDirty(pages: stale)
        metrics.dirtyRate(s.dirtyRate.perSecond)
        let change = try source.refreshLayout()
        guard !change.isEmpty else { return false }
        s.layout = change.regions
        s.layoutEpoch += 1
        s.store.reconcile(layout: s.layout)
        // An address whose backing changed was covered before and is still
        // covered: it is dirty, whatever was sent from it.
        s.store.markDirty(change.newlyDirty)
        // What the refresh registered anew is reported by the next scan;
        // take it now, so a Finalize misses nothing.
        s.store.markDirty(try source.scanWrittenSinceRead())
        return true
    }

    private func sync(knownEpoch: UInt64) throws -> SyncReply {
        try reading.exclusive { try state.withLock { s in
            guard s.phase == .tracking || s.phase == .frozen else {
                throw RPCError(code: .badRequest, message: "Sync needs a tracking session")
            }
            if s.phase == .tracking { _ = try rescan(&s) }
            return SyncReply(layoutEpoch: s.layoutEpoch, layout: knownEpoch == s.layoutEpoch ? nil : s.layout,
                             dirty: s.store.ranges(in: [.dirty], maxPages: Int(UInt32.max)),
                             dirtyPagesPerSecond: UInt64(s.dirtyRate.perSecond))
        } }
    }

    private func finalize() throws -> FinalizeReply {
        let reply = try reading.exclusive { try state.withLock { s -> FinalizeReply in
            if let done = s.finalized { return done }
            guard s.phase == .tracking else {
                throw RPCError(code: .badRequest, message: "Finalize needs a tracking session, this one is \(s.phase!)")
            }
            let frozeAt = ContinuousClock.now
            let frozenFor = try source.freeze()
            do {
                _ = try rescan(&s)
            } catch {
                try? source.thaw()
                throw error
            }
            var dirty = s.store.ranges(in: [.dirty], maxPages: Int(UInt32.max))
            dirty += source.unprotectable.map(\.range)
            let micros = UInt64(frozenFor.components.seconds) * 1_000_000
                + UInt64(frozenFor.components.attoseconds / 1_000_000_000_000)
            let reply = FinalizeReply(layoutEpoch: s.layoutEpoch, layout: s.layout, dirty: dirty,
                                      freezeMicroseconds: micros)
            s.finalized = reply
            s.frozenAtMilliseconds = UInt64(Date().timeIntervalSince1970 * 1000)
            s.phase = .frozen
            metrics.entered(.frozen)
            metrics.finalized(downtime: .now - frozeAt, freezeMicroseconds: micros)
            return reply
        } }
        let pages = reply.dirty.reduce(0) { $0 + $1.pageCount }
        events(.finalized(freezeMilliseconds: Double(reply.freezeMicroseconds) / 1000, dirtyPages: pages))
        return reply
    }

    private func checksum(_ ranges: [AddressRange]) throws -> ChecksumReply {
        let (phase, migrated) = state.withLock { ($0.phase, $0.migrated) }
        guard phase == .frozen else {
            throw RPCError(code: .badRequest, message: "Checksum is only answered once the process is frozen")
        }
        for range in ranges where Ranges.subtract([range], migrated) != [] {
            throw RPCError(code: .badRequest,
                           message: "range \(range) is not migrated memory of pid \(source.pid): Checksum covers only the final layout's migrated regions")
        }
        var digests: [[UInt8]] = []
        let chunk = 1024 * Int(pageSize)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: Int(pageSize))
        defer { buffer.deallocate() }
        for range in ranges {
            var hasher = Blake2b256()
            var start = range.start
            while start < range.end {
                let end = min(range.end, start + UInt64(chunk))
                let view = UnsafeMutableRawBufferPointer(rebasing: buffer[..<Int(end - start)])
                let vanished = try source.readPages([AddressRange(start: start, end: end)], into: view)
                // Holes (mapped, unbacked) count as zeros, as the image holds them;
                // the reader zero-filled them.
                guard Ranges.subtract(Ranges.merge(vanished), try unbacked(vanished)).isEmpty else {
                    throw RPCError(code: .badRequest, message: "range \(range) is not mapped in pid \(source.pid)")
                }
                hasher.update(UnsafeRawBufferPointer(view))
                start = end
            }
            digests.append(hasher.finish())
        }
        var reply = ChecksumReply(digests: digests)
        if let key = options.signingKey {
            let (session, frozenAt, layout) = state.withLock { ($0.session, $0.frozenAtMilliseconds, $0.finalized?.layout ?? $0.layout) }
            try reply.sign(with: key, pid: source.pid, host: options.host, session: session,
                           frozenAtMilliseconds: frozenAt, layout: layout, ranges: ranges)
        }
        return reply
    }

    private func complete() throws -> OutcomeReply {
        let phase = state.withLock { $0.phase }
        guard phase == .frozen else {
            throw RPCError(code: .badRequest, message: "Complete needs a finalized migration; call Finalize first")
        }
        try source.release(then: options.then)
        let message: String
        switch options.then {
        case .stop: message = "pid \(source.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"
        case .kill: message = "pid \(source.pid) was killed"
        case .resume: message = "pid \(source.pid) runs on"
        }
        finish(.completed(message), abort: false)
        return OutcomeReply(message: message)
    }

    private func abortSession() throws -> OutcomeReply {
        let frozen = state.withLock { $0.phase == .frozen }
        try source.release(then: .resume)
        let message = frozen
            ? "migration aborted by the leecher; pid \(source.pid) was thawed and runs on as before"
            : "migration aborted by the leecher before the freeze; pid \(source.pid) runs on as before, no longer tracked"
        finish(.aborted(message), abort: true)
        return OutcomeReply(message: message)
    }
}

/// Answers RPCs on `transport` until the peer goes; returns why it ended.
/// The seeder and the hub serve their callers this way.
func answerRPCs(on transport: FrameTransport, with handler: @escaping RPCServer.Handler) async
    -> (reason: String, inOrder: Bool) {
    let server = RPCServer(transport: transport, handler: handler)
    var end = (reason: "connection closed", inOrder: true)
    do {
        try await server.run()
    } catch {
        end = ("\(error)", false)
    }
    transport.close()
    return end
}

/// Pages per second over the last few seconds.
struct RateMeter: Sendable {
    private var samples: [(ContinuousClock.Instant, UInt64)] = []

    mutating func add(_ count: UInt64) {
        let now = ContinuousClock.now
        samples.append((now, count))
        samples.removeAll { now - $0.0 > .seconds(3) }
    }

    var perSecond: Double {
        guard let first = samples.first, let last = samples.last, last.0 > first.0 else { return 0 }
        let total = samples.dropFirst().reduce(0) { $0 + $1.1 }
        let span = last.0 - first.0
        return Double(total) / (Double(span.components.seconds) + Double(span.components.attoseconds) / 1e18)
    }
}
