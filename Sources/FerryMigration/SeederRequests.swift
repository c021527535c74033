// The seeder's answers to the migration protocol's methods (MigrationServer):
// who may call what, Track, and the hand-off of blocking work (ptrace stops,
// scans, the freeze, hashing) to threads of their own, so none of it holds a
// thread of the cooperative pool, which serves post-copy reads meanwhile.
import FerryToolkit

extension SeederService {
    var role: String { "seeder" }
    var companionRule: String { "a companion connection may only ReadAt while the migration runs" }

    func makeConnection(peer: String) -> SeederConnection { SeederConnection() }

    func hello() -> HelloReply {
        let phase = state.withLock { $0.phase }
        return HelloReply(migration: options.migration, pid: source.pid, host: options.host, phase: phase)
    }

    /// Issue 13: the methods of `options.extraMethods` (CriuSource.swift), for the session's owner only.
    func extensionMethod(_ method: UInt16, _ payload: [UInt8], on connection: SeederConnection) async throws -> [[UInt8]]? {
        guard let extra = options.extraMethods, extra.handles(method) else { return nil }
        try requireOwner(connection)
        return try await extra.handle(method, payload)
    }

    func session(of connection: SeederConnection, companion: Bool) throws -> SeederConnection {
        if companion {
            let phase = state.withLock { $0.phase }
            guard phase == .tracking || phase == .frozen else {
                throw RPCError(code: .badRequest, message: companionRule)
            }
        } else {
            try requireOwner(connection)
        }
        return connection
    }

    func track(_ request: TrackRequest, on connection: SeederConnection) async throws -> TrackReply {
        // Starting to track stops the process for remote system calls.
        try await blocking("Track") { try self.track(request, connection) }
    }

    func readAt(_ request: ReadRequest, parts: RPCPartWriter, for connection: SeederConnection,
                urgent: Bool) async throws {
        let huge = state.withLock { s in
            s.hugePages.filter { region in request.ranges.contains { $0.start < region.end && region.start < $0.end } }
        }
        try await connection.readBudget.withBytes(huge.isEmpty ? MigrationLimits.readAtHolds : MigrationLimits.hugeReadAtHolds) {
            try await readAt(request, huge: huge, parts, urgent: urgent)
        }
    }

    func sync(knownEpoch: UInt64, for connection: SeederConnection) async throws -> SyncReply {
        try await blocking("Sync") { try self.sync(knownEpoch: knownEpoch) }
    }

    func finalize(for connection: SeederConnection) async throws -> FinalizeReply {
        try await blocking("Finalize") { try self.finalize() }
    }

    func checksum(_ ranges: [AddressRange], for connection: SeederConnection) async throws -> ChecksumReply {
        // Hashing the whole frozen source takes about a second per GiB.
        try await blocking("Checksum") { try self.checksum(ranges) }
    }

    func complete(for connection: SeederConnection) async throws -> OutcomeReply {
        try await blocking("Complete") { try self.complete() }
    }

    func abort(for connection: SeederConnection) async throws -> OutcomeReply {
        try await blocking("Abort") { try self.abortSession() }
    }

    /// Runs `body`, which blocks (on the ptrace thread, the kernel or a
    /// lock held across either), on a thread of its own.
    private func blocking<T: Sendable>(_ method: String, _ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await runOnDedicatedThread(for: "the \(method) of pid \(source.pid)", body)
    }

    private func requireOwner(_ connection: SeederConnection) throws {
        let owner = connection.owner.load(ordering: .acquiring)
        let (current, phase) = state.withLock { ($0.owner, $0.phase) }
        guard owner != 0, owner == current else {
            throw RPCError(code: .badRequest, message: "call Track first: this connection does not own the migration of pid \(source.pid)")
        }
        if let phase, phase == .completed || phase == .aborted {
            throw RPCError(code: .badRequest, message: "the migration of pid \(source.pid) has already \(phase)")
        }
    }

    private func track(_ request: TrackRequest, _ connection: SeederConnection) throws -> TrackReply {
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
            let phase: SessionPhase
            switch (s.phase, request.resume) {
            case (nil, nil):
                try source.startTracking()
                s.session = (0..<16).map { _ in UInt8.random(in: 0...255) }
                phase = .tracking
                s.phase = phase
                s.layout = source.regions
                s.store = PageStore(layout: s.layout)
                metrics.entered(.tracking)
            case (nil, .some):
                throw RPCError(code: .badRequest, message: "no migration of pid \(pid) to resume: the seeder has no session")
            case (.some(let current), let resume):
                guard resume == s.session else {
                    throw RPCError(code: .unavailable, message: "pid \(pid) is already being migrated (\(current)) to another leecher; one migration at a time per process: use a hub to feed several destinations")
                }
                // A completed session still answers its own leecher, whose
                // Complete reply may have been lost with the connection.
                guard current != .aborted else {
                    throw RPCError(code: .badRequest, message: "the migration of pid \(pid) has already \(current)")
                }
                phase = current
            }
            if request.resume != nil { metrics.resumed() }
            s.owner += 1
            s.ownerAlive = true
            connection.owner.store(s.owner, ordering: .releasing)
            return TrackReply(session: s.session, phase: phase, pid: pid, host: options.host,
                              tracker: source.trackerName,
                              graceMilliseconds: options.grace.milliseconds(clampedTo: 0...UInt32.max),
                              layoutEpoch: s.layoutEpoch, layout: s.layout)
        }
        if request.resume == nil {
            let pages = reply.layout.filter { $0.kind == .migrate }.reduce(0) { $0 + $1.range.pageCount }
            events(.tracking(regions: reply.layout.count, migratePages: pages, tracker: reply.tracker))
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
