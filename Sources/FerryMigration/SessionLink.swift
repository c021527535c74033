// The calling side's connection to a seeder (or a hub): opens it with Track,
// and when the link fails, reconnects with backoff and resumes the session
// within the peer's grace period. Calls made through the link are retried on
// the new connection, so a dropped link costs a pause, not the migration.
// The leecher and the hub's upstream both use it.

import FerryToolkit

/// What a link reports while it works.
public enum LinkEvent: Sendable {
    case reconnecting(attempt: Int, reason: String)
    case resumed(phase: SessionPhase)
}

public actor SessionLink {
    public typealias Connector = @Sendable () async throws -> FrameTransport
    /// For a peer that dialed us (`seeder serve --via`): the RPC client
    /// already speaking on its connection, and who it is.
    public typealias ClientConnector = @Sendable () async throws -> (RPCClient, String)

    private let connect: ClientConnector
    private let migration: String
    private let events: @Sendable (LinkEvent) -> Void
    private var client: RPCClient?
    /// Increases with every new connection; a failure seen on an older one
    /// was already dealt with.
    private var generation = 0
    private var closed = false
    /// Why resuming failed for good (refused, or past the peer's grace
    /// period, after which the peer has dropped the session): later calls
    /// fail at once with it instead of retrying for another grace period.
    private var lost: MigrationError?
    public private(set) var session: [UInt8]?
    /// The first Track reply (pid, host, tracker, grace, initial layout).
    public private(set) var first: TrackReply?
    /// The phase the peer reported at the last (re)connection.
    public private(set) var phase: SessionPhase = .tracking
    public private(set) var peer = ""

    public init(migration: String = "", connect: @escaping Connector,
                events: @escaping @Sendable (LinkEvent) -> Void = { _ in }) {
        self.init(migration: migration, connectClient: {
            let transport = try await connect()
            return (RPCClient(transport: transport), transport.peerDescription)
        }, events: events)
    }

    public init(migration: String = "", connectClient: @escaping ClientConnector,
                events: @escaping @Sendable (LinkEvent) -> Void = { _ in }) {
        self.connect = connectClient
        self.migration = migration
        self.events = events
    }

    /// True for a companion link: a second connection joining `session` for
    /// priority reads, without taking the session from its owner.
    private var companion = false

    /// A companion of this link: same peer, same session, its own connection,
    /// so small urgent reads do not queue behind this link's bulk replies.
    public func companionLink(connect: @escaping Connector) async -> SessionLink {
        let link = SessionLink(migration: migration, connect: connect)
        await link.joining(session: session, first: first)
        return link
    }

    private func joining(session: [UInt8]?, first: TrackReply?) {
        self.session = session
        self.first = first
        companion = true
    }

    /// The connection being opened, which concurrent callers wait for rather
    /// than open a second one (the actor is re-entered at every await).
    private var opening: Task<TrackReply, any Error>?

    /// Connects and tracks (or resumes); returns the Track reply.
    @discardableResult
    public func open() async throws -> TrackReply {
        if let opening { return try await opening.value }
        let task = Task { try await self.openNow() }
        opening = task
        defer { opening = nil }
        return try await task.value
    }

    private func openNow() async throws -> TrackReply {
        let (candidate, peerName) = try await connect()
        let reply: TrackReply
        do {
            reply = try TrackReply.decode(try await candidate.call(
                MigrationMethod.track.rawValue,
                TrackRequest(resume: session, migration: migration, companion: companion).encode()))
        } catch {
            candidate.close()
            throw error
        }
        if first == nil { first = reply }
        session = reply.session
        if !companion { phase = reply.phase }
        peer = peerName
        client = candidate
        generation += 1
        return reply
    }

    /// The reconnection in progress, which every caller that finds the link
    /// down waits for (and whose failure, the final word, they all report).
    private var reconnecting: Task<Void, any Error>?

    /// The current client and its generation, connecting if there is none.
    func current() async throws -> (RPCClient, Int) {
        if closed { throw MigrationError.connectionLost("the link to the seeder is closed") }
        if let lost { throw lost }
        if let reconnecting { try await reconnecting.value }
        if let client { return (client, generation) }
        if session == nil || (companion && generation == 0) {
            try await open()
            // Another caller may have closed the link while this one waited.
            guard let client else { throw MigrationError.connectionLost("the link to the seeder is closed") }
            return (client, generation)
        }
        // The link is down and nobody is reconnecting yet: do it, with the
        // same retries, rather than fail on the first refused dial.
        try await failed(generation, MigrationError.connectionLost("the connection to the seeder dropped"))
        guard let client else { throw MigrationError.connectionLost("the link to the seeder is closed") }
        return (client, generation)
    }

    /// Called after a link failure seen on connection `seen`: reconnects and
    /// resumes unless another caller already did or is doing it. Once
    /// resuming has failed for good, every later call fails the same way.
    func failed(_ seen: Int, _ error: any Error) async throws {
        if let lost { throw lost }
        if let reconnecting {
            try await reconnecting.value
            return
        }
        guard seen == generation, !closed else { return }
        client?.close()
        client = nil
        if companion {
            // A companion lane is a shortcut, not the migration: when it fails,
            // callers fall back to the owning link at once.
            let failure = MigrationError.connectionLost("the companion connection failed: \(error)")
            lost = failure
            throw failure
        }
        guard session != nil else { throw error }
        let task = Task { try await self.reconnect(after: error) }
        reconnecting = task
        defer { reconnecting = nil }
        try await task.value
    }

    private func reconnect(after error: any Error) async throws {
        let grace: Duration = .milliseconds(first?.graceMilliseconds ?? 5000)
        let deadline = ContinuousClock.now + grace
        var delay: Duration = .milliseconds(50)
        var last: any Error = error
        var attempt = 0
        while ContinuousClock.now < deadline {
            if closed { return }
            attempt += 1
            events(.reconnecting(attempt: attempt, reason: "\(last)"))
            do {
                let reply = try await open()
                events(.resumed(phase: reply.phase))
                return
            } catch let refusal as RPCError where !isLinkFailure(refusal) {
                let failure = MigrationError.connectionLost(
                    "lost the connection to the seeder (\(error)) and it refused to resume: \(refusal.message)")
                lost = failure
                throw failure
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                last = error
            }
            try await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(1))
        }
        let failure = MigrationError.connectionLost(
            "lost the connection to the seeder and could not resume within its grace period of \(grace.inSeconds) s: \(last)")
        lost = failure
        throw failure
    }

    public func close() {
        closed = true
        client?.close()
        client = nil
    }

    /// One call, retried on a resumed connection after link failures. A
    /// refusal from the peer is final and says which call it refused.
    public nonisolated func call(_ method: MigrationMethod, _ payload: [UInt8]) async throws -> [UInt8] {
        try await retrying(method) { client in try await client.call(method.rawValue, payload) }
    }

    /// Like `call`, for streamed replies: every part, in order.
    public nonisolated func callParts(_ method: MigrationMethod, _ payload: [UInt8]) async throws -> [[UInt8]] {
        try await retrying(method) { client in
            var parts: [[UInt8]] = []
            var bytes = 0
            let limit = MigrationLimits.maxReplyBytes(method)
            for try await part in client.callStreaming(method.rawValue, payload) {
                bytes += part.count
                // Leaving the loop cancels the call.
                guard bytes <= limit else {
                    throw MigrationError.protocolViolation(
                        "the peer sent more than \(limit >> 20) MiB in reply to one \(method), the protocol's limit; the connection cannot be trusted")
                }
                parts.append(part)
            }
            return parts
        }
    }

    private nonisolated func retrying<T: Sendable>(_ method: MigrationMethod,
                                                   _ body: @Sendable (RPCClient) async throws -> T) async throws -> T {
        while true {
            let (client, seen) = try await current()
            do {
                return try await body(client)
            } catch {
                guard isLinkFailure(error) else {
                    if let rpc = error as? RPCError {
                        throw MigrationError.seeder("the seeder refused \(method): \(rpc.message)")
                    }
                    throw error
                }
                try await failed(seen, error)
            }
        }
    }
}

/// True for errors that mean the link failed (reconnect and resume), false
/// for replies in which the peer refused something (final).
func isLinkFailure(_ error: any Error) -> Bool {
    if error is MigrationError || error is CancellationError { return false }
    guard let rpc = error as? RPCError else { return true }
    return rpc.code.rawValue >= 0xFF00
}
