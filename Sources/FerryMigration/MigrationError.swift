// Errors of the migration roles. Each message says what failed, on what,
// and what to do; the command-line tools print them as they are.

public enum MigrationError: Error, CustomStringConvertible, Sendable, Equatable {
    /// A command-line value or file that cannot be used.
    case badArgument(String)
    /// The output directory cannot be used or written.
    case image(String)
    /// The peer broke the migration protocol.
    case protocolViolation(String)
    /// The seeder refused or failed a request.
    case seeder(String)
    /// The connection to the peer was lost and could not be resumed.
    case connectionLost(String)

    public var description: String {
        switch self {
        case .badArgument(let text), .image(let text), .protocolViolation(let text),
             .seeder(let text), .connectionLost(let text):
            return text
        }
    }
}

/// The leecher was cancelled (SIGINT, SIGTERM in `leecher pull`) and told
/// the seeder to abort. The command line names the signal.
public struct MigrationInterrupted: Error, CustomStringConvertible, Sendable, Equatable {
    /// What became of the source: the seeder's (or hub's) answer to the
    /// abort, or why there is none.
    public let source: String

    public init(source: String) { self.source = source }

    public var description: String { "interrupted; \(source)" }
}
