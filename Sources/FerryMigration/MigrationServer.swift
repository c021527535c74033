// The answering side of the migration protocol, written once for every
// server: the seeder answers from the process it tracks, a hub from its cache
// and its upstream. A server implements one typed method per
// `MigrationMethod`; `MigrationDispatcher` decodes each request, checks the
// protocol version and what a companion connection may ask, calls the typed
// method, and encodes its reply, streaming the parts of a Sync or Finalize
// dirty report (Protocols/migration.md).

/// Per-connection state of a migration server.
protocol MigrationConnection: Sendable {
    /// A companion connection (post-copy touches of a session another
    /// connection owns): it may call ReadAt only.
    var isCompanion: Bool { get }
}

/// A server of the migration protocol: one typed method per method number.
/// Hello and Track are answered on any connection; the rest only after
/// `session(of:companion:)` found what the connection acts for.
protocol MigrationServer: AnyObject, Sendable {
    associatedtype Connection: MigrationConnection
    /// What a connection acts for once it called Track.
    associatedtype Session: Sendable

    /// "seeder" or "hub", as error messages name this side.
    var role: String { get }
    /// Counts connections and failed requests.
    var metrics: MigrationMetrics { get }
    /// The refusal a companion connection gets for anything but an allowed ReadAt.
    var companionRule: String { get }

    /// State for a new connection from `peer`.
    func makeConnection(peer: String) -> Connection
    /// The connection ended: `inOrder` when the peer hung up rather than failed.
    func connectionEnded(_ connection: Connection, peer: String, reason: String, inOrder: Bool)

    func hello() -> HelloReply
    /// A method beyond `MigrationMethod` (the CRIU images of issue 13),
    /// asked on an owning connection: its reply's parts, or nil when this
    /// server does not know it.
    func extensionMethod(_ method: UInt16, _ payload: [UInt8], on connection: Connection) async throws -> [[UInt8]]?
    /// Called with a request whose version this side speaks.
    func track(_ request: TrackRequest, on connection: Connection) async throws -> TrackReply
    /// The session `connection` acts for. Throws when it has none (no Track
    /// yet, or it lost the session), or, for a companion connection
    /// (`companion`), when its ReadAt requests are not answered now; then the
    /// error text is `companionRule`.
    func session(of connection: Connection, companion: Bool) throws -> Session
    /// Streams the pages through `parts`; `urgent` for a companion
    /// connection's reads, which skip the bandwidth cap's queue.
    func readAt(_ request: ReadRequest, parts: RPCPartWriter, for session: Session, urgent: Bool) async throws
    func sync(knownEpoch: UInt64, for session: Session) async throws -> SyncReply
    func finalize(for session: Session) async throws -> FinalizeReply
    func checksum(_ ranges: [AddressRange], for session: Session) async throws -> ChecksumReply
    func complete(for session: Session) async throws -> OutcomeReply
    func abort(for session: Session) async throws -> OutcomeReply
}

extension MigrationServer {
    /// No extension methods unless a server has some.
    func extensionMethod(_ method: UInt16, _ payload: [UInt8], on connection: Connection) async throws -> [[UInt8]]? { nil }

    /// Answers requests on `transport` until the peer goes, then tells
    /// `connectionEnded` why.
    func answer(_ transport: FrameTransport) async {
        let connection = makeConnection(peer: transport.peerDescription)
        metrics.connected()
        let end = await answerRPCs(on: transport) { [self] method, payload, parts in
            do {
                return try await MigrationDispatcher.dispatch(method, payload, parts, to: self, on: connection)
            } catch {
                metrics.error(.request)
                throw error
            }
        }
        connectionEnded(connection, peer: transport.peerDescription, reason: end.reason, inOrder: end.inOrder)
    }
}

/// Turns RPC requests into calls of a `MigrationServer`'s typed methods.
enum MigrationDispatcher {
    static func dispatch<Server: MigrationServer>(_ method: UInt16, _ payload: [UInt8], _ parts: RPCPartWriter,
                                                  to server: Server, on connection: Server.Connection)
        async throws -> [UInt8] {
        guard let known = MigrationMethod(rawValue: method) else {
            if !connection.isCompanion, let reply = try await server.extensionMethod(method, payload, on: connection) {
                return try await stream(reply, through: parts)
            }
            throw RPCError(code: .unknownMethod, message: "unknown method 0x\(String(method, radix: 16))")
        }
        switch known {
        case .hello:
            return server.hello().encode()
        case .track:
            let request = try TrackRequest.decode(payload)
            guard request.version == MigrationLimits.version else {
                throw RPCError(code: .badRequest,
                               message: "migration protocol version \(request.version) is not supported; this \(server.role) speaks \(MigrationLimits.version)")
            }
            return try await server.track(request, on: connection).encode()
        case .readAt, .sync, .finalize, .checksum, .complete, .abort:
            break
        }
        let companion = connection.isCompanion
        if companion && known != .readAt {
            throw RPCError(code: .badRequest, message: server.companionRule)
        }
        let session = try server.session(of: connection, companion: companion)
        switch known {
        case .hello, .track:
            throw RPCError(code: .internalError, message: "\(known) is answered before the session is looked up")
        case .readAt:
            try await server.readAt(ReadRequest.decode(payload), parts: parts, for: session, urgent: companion)
            return []
        case .sync:
            var reader = WireReader(payload)
            let epoch = try reader.u64("layout epoch")
            try reader.expectEnd("Sync request")
            let reply = try await server.sync(knownEpoch: epoch, for: session)
            return try await stream(DirtyReportCodec.parts(epoch: reply.layoutEpoch, layout: reply.layout,
                                                           dirty: reply.dirty, rate: reply.dirtyPagesPerSecond,
                                                           freeze: 0), through: parts)
        case .finalize:
            let reply = try await server.finalize(for: session)
            return try await stream(DirtyReportCodec.parts(epoch: reply.layoutEpoch, layout: reply.layout,
                                                           dirty: reply.dirty, rate: 0,
                                                           freeze: reply.freezeMicroseconds), through: parts)
        case .checksum:
            var reader = WireReader(payload)
            let ranges = try reader.ranges()
            try reader.expectEnd("Checksum request")
            return try await server.checksum(ranges, for: session).encode()
        case .complete:
            return try await server.complete(for: session).encode()
        case .abort:
            return try await server.abort(for: session).encode()
        }
    }

    /// Sends all of a multi-part reply but its last part through `parts`,
    /// and returns the last, which ends the reply.
    static func stream(_ encoded: [[UInt8]], through parts: RPCPartWriter) async throws -> [UInt8] {
        guard let last = encoded.last else {
            throw RPCError(code: .internalError, message: "a streamed reply has no parts")
        }
        for part in encoded.dropLast() { try await parts.send(part) }
        return last
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
