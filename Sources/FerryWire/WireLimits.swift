// Every limit of the wire protocol in one place, each with its reason.
// `Protocols/wire.md` § Limits is the normative copy; keep the two in step.

/// Named limits of the Ferry wire protocol (version 1).
public enum WireLimits {
    /// Largest frame a peer may send before the handshake completes. Handshake
    /// messages are under 300 bytes; 4 KiB leaves room for future fields while
    /// denying an unauthenticated peer any large buffer.
    public static let handshakeMaxFrame = 4096

    /// Time a peer has to complete the whole handshake. Honest peers need a few
    /// round trips; anything slower is holding a connection slot for free.
    public static let handshakeTimeout: Duration = .seconds(10)

    /// Connections a listener lets run their handshake at the same time;
    /// further ones get Reject(`busy`) and are closed at once. Each pending
    /// handshake holds a socket, a libuv handle, a task and at most one
    /// `handshakeMaxFrame` buffer (about 20 KiB all told), for up to
    /// `handshakeTimeout`: 64 of them cost about 1 MiB, while an honest
    /// seeder sees one leecher and a hub a few dozen connecting at once.
    /// Authenticated connections do not count.
    public static let maxPendingHandshakes = 64

    /// Largest RPC payload or streamed part (8 MiB): a page batch of "a few MiB"
    /// fits with room to spare, and a receiver never allocates more for one frame.
    public static let maxPayload = 8 << 20

    /// Largest frame after authentication: one maximal payload plus RPC and
    /// record headers and the AEAD tag (bounded by 256 bytes of overhead).
    public static let maxFrame = maxPayload + 256

    /// Requests a client may have outstanding; servers refuse more with
    /// `RPCErrorCode.overloaded`. CRIU's lazy-pages pipeline uses 256.
    public static let maxInFlight = 1024

    /// Rekey a direction after this many records (2^32): far below AES-GCM's
    /// 2^32-invocations-per-key guidance when counted with the byte limit below.
    public static let rekeyRecords: UInt64 = 1 << 32

    /// Rekey a direction after this many plaintext bytes (2^36 = 64 GiB), well
    /// inside AES-256-GCM's and ChaCha20-Poly1305's per-key data bounds.
    public static let rekeyBytes: UInt64 = 1 << 36

    /// Longest human-readable text in a Reject message or an RPC error reply.
    public static let maxReasonText = 512

    /// Small messages are coalesced into one frame up to this size; larger
    /// messages travel in their own frame.
    public static let batchBytes = 64 << 10
}
