// How the commands open authenticated connections: the credentials and the
// compression offer of the command line, a transport (dialed, spawned for an
// `exec:` address, standard input/output, or a listener's), and the
// handshake over it. A transport whose handshake fails is closed here.
import FerryMigration

/// Where a leecher (or a hub, upstream) connects: a socket address, or a
/// command to speak to over its standard input and output.
public enum PeerAddress: Sendable, CustomStringConvertible {
    case endpoint(Endpoint)
    /// `exec:COMMAND` (CommandTransport.swift).
    case command(String)

    public init(parsing text: String) throws {
        if let command = CommandTransport.command(in: text) {
            self = .command(command)
        } else {
            self = .endpoint(try Endpoint(parsing: text))
        }
    }

    public var description: String {
        switch self {
        case .endpoint(let endpoint): return "\(endpoint)"
        case .command(let command): return "exec:\(command)"
        }
    }
}

/// One side's credentials and secure-channel options, and the ways a
/// command connects with them.
public struct Connections: Sendable {
    public let credentials: Credentials
    public let options: SecureChannelOptions

    public init(credentials: Credentials, compression: CompressOptions) {
        self.credentials = credentials
        self.options = compression.channelOptions
    }

    /// Connects to `address` and runs the client handshake.
    public func dial(_ address: PeerAddress) async throws -> SecureChannel {
        switch address {
        case .endpoint(let endpoint): return try await handshake(client: Transports.connect(to: endpoint))
        case .command(let command): return try await handshake(client: CommandTransport.spawn(command))
        }
    }

    /// Connects to `endpoint` and runs the client handshake.
    public func dial(_ endpoint: Endpoint) async throws -> SecureChannel {
        try await dial(.endpoint(endpoint))
    }

    /// Runs the server handshake over `transport` (a connection already
    /// accepted, or standard input/output).
    public func accept(_ transport: FrameTransport) async throws -> SecureChannel {
        try await closingOnFailure(transport) {
            try await SecureChannel.server(over: transport, credentials: credentials, options: options)
        }
    }

    /// Accepts connections on `listener` until it closes, running each
    /// handshake (at most WireLimits.maxPendingHandshakes at a time):
    /// `authenticated` gets each channel, `refused` each peer that failed.
    public func accept(on listener: Listener, authenticated: @escaping @Sendable (SecureChannel) async -> Void,
                       refused: @escaping @Sendable (_ peer: String, _ error: any Error) -> Void) async {
        await listener.serveHandshakes(credentials: credentials, options: options,
                                       authenticated: authenticated, refused: refused)
    }

    private func handshake(client transport: FrameTransport) async throws -> SecureChannel {
        try await closingOnFailure(transport) {
            try await SecureChannel.client(over: transport, credentials: credentials, options: options)
        }
    }

    /// Runs the handshake `body` over `transport`, closing it if that fails.
    private func closingOnFailure(_ transport: FrameTransport,
                                  _ body: () async throws -> SecureChannel) async throws -> SecureChannel {
        do {
            return try await body()
        } catch {
            transport.close()
            throw error
        }
    }
}
