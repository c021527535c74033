// The transport interface: everything the secure channel and the RPC know
// about the wire. Implementations: libuv TCP and Unix sockets, standard
// input/output, and an in-memory pair for tests.

/// An ordered, reliable, bidirectional stream of frames with backpressure.
///
/// A frame is an opaque byte string; on byte streams it travels as a 4-byte
/// big-endian length followed by the bytes (see `Protocols/wire.md`).
public protocol FrameTransport: AnyObject, Sendable {
    /// Queues one frame. Suspends while the transport's send window is full,
    /// which is the backpressure the RPC relies on. Throws once the transport
    /// is closed or failed.
    func send(_ frame: [UInt8]) async throws

    /// The next frame, or `nil` when the peer closed the stream cleanly at a
    /// frame boundary. A peer that stops mid-frame, or announces a frame longer
    /// than `maxIncomingFrameSize`, makes this throw before anything is allocated.
    func receive() async throws -> [UInt8]?

    /// The largest frame `receive` accepts. The secure channel keeps it small
    /// until the peer is authenticated, then raises it.
    func setMaxIncomingFrameSize(_ bytes: Int)

    /// Closes both directions. Idempotent; pending `receive` calls return `nil`
    /// or throw, pending `send` calls throw.
    func close()

    /// Who is on the other end, for error messages ("127.0.0.1:7070", "stdio").
    var peerDescription: String { get }
}

/// Failures common to every transport. Transports may throw their own errors
/// as well (socket errors); these are the ones the protocol itself defines.
public enum TransportError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The transport was closed locally; nothing more can be sent or received.
    case closed(peer: String)
    /// The peer went away (or closed its receiving side) while we were sending.
    case peerClosed(peer: String)
    /// The peer announced a frame over the current limit; the connection is closed
    /// before anything is allocated.
    case frameTooLarge(peer: String, size: Int, limit: Int)
    /// The stream ended in the middle of a frame.
    case truncatedFrame(peer: String, expected: Int, received: Int)

    public var description: String {
        switch self {
        case .closed(let peer):
            return "connection to \(peer) is closed"
        case .peerClosed(let peer):
            return "\(peer) closed the connection"
        case .frameTooLarge(let peer, let size, let limit):
            return "\(peer) sent a frame of \(size) bytes, over the limit of \(limit) bytes at this stage; connection closed"
        case .truncatedFrame(let peer, let expected, let received):
            return "\(peer) closed the connection in the middle of a frame (\(received) of \(expected) bytes)"
        }
    }
}
