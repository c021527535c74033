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
