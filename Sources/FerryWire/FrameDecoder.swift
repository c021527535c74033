// Turns a byte stream back into frames: each frame is a 4-byte big-endian
// length followed by that many bytes (`Protocols/wire.md`). Pure Swift and
// bounds-checked, so the fuzz target can drive it without sockets. The length
// is checked against the limit *before* any buffer for the frame is allocated:
// a peer cannot make us reserve memory by announcing a large frame.

/// A stream deframer for length-prefixed frames.
public struct FrameDecoder: Sendable {
    /// Bytes of the length prefix.
    public static let headerSize = 4

    /// Why decoding stopped.
    public enum Failure: Error, CustomStringConvertible, Sendable, Equatable {
        /// A header announced more than the limit; nothing was allocated for it.
        case frameTooLarge(announced: Int, limit: Int)
        /// The stream ended inside a frame (header or body).
        case closedMidFrame(received: Int, expected: Int)

        public var description: String {
            switch self {
            case .frameTooLarge(let n, let limit):
                return "peer announced a frame of \(n) bytes, limit \(limit)"
            case .closedMidFrame(let got, let expected):
                return "connection closed mid-frame (\(got) of \(expected) bytes received)"
            }
        }
    }

    /// The largest frame body accepted. A header announcing more stops the
    /// decoder (see `oversizedAnnouncement`) before anything is allocated.
    public var maxFrameSize: Int

    // Header bytes gathered so far (a header may straddle two reads).
    private var header: UInt32 = 0
    private var headerBytes = 0
    // The body being gathered: `body` has the announced length from the
    // start and `filled` bytes of it are received; `expected` is nil while no
    // header is complete.
    private var body: [UInt8] = []
    private var filled = 0
    private var expected: Int? = nil
    /// The announced length that stopped decoding, if any. Raise
    /// `maxFrameSize` and call `resume()` to accept it, or give up.
    public private(set) var oversizedAnnouncement: Int? = nil

    public init(maxFrameSize: Int) {
        precondition(maxFrameSize >= 0, "maxFrameSize must not be negative")
        self.maxFrameSize = maxFrameSize
    }

    /// True when no partial frame is buffered: a stream may end cleanly here.
    public var isAtFrameBoundary: Bool { headerBytes == 0 && expected == nil && oversizedAnnouncement == nil }

    /// Bytes of a partial frame held (header and body).
    public var partialByteCount: Int { headerBytes + filled }

    /// Consumes bytes and calls `deliver` for every complete frame, in order.
    /// Returns how many bytes were consumed: all of them, unless a header
    /// announced more than `maxFrameSize`, in which case decoding stops right
    /// after that header and `oversizedAnnouncement` is set. The caller keeps
    /// the unconsumed bytes if it wants to `resume()` later.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, deliver: ([UInt8]) -> Void) -> Int {
        if oversizedAnnouncement != nil { return 0 }
        var offset = 0
        let count = bytes.count
        while offset < count {
            if let want = expected {
                // Gathering a body.
                let take = min(want - filled, count - offset)
                let at = filled
                body.withUnsafeMutableBytes { dst in
                    // SAFETY: at + take <= want == dst.count; the source range is in bounds.
                    (dst.baseAddress! + at).copyMemory(from: bytes.baseAddress! + offset, byteCount: take)
                }
                filled += take
                offset += take
                if filled == want { deliver(takeBody()) }
                continue
            }
            // Fast path: a whole header at a frame boundary.
            if headerBytes == 0 && count - offset >= Self.headerSize {
                header = UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16
                    | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
                headerBytes = Self.headerSize
                offset += Self.headerSize
            } else {
                header = header << 8 | UInt32(bytes[offset])
                headerBytes += 1
                offset += 1
                if headerBytes < Self.headerSize { continue }
            }
            // A complete header: check before allocating anything.
            let length = Int(header)
            headerBytes = 0
            header = 0
            if length > maxFrameSize {
                oversizedAnnouncement = length
                return offset
            }
            if length == 0 {
                deliver([])
                continue
            }
            if count - offset >= length {
                // Fast path: the whole body is here; copy it once.
                deliver(Array(UnsafeRawBufferPointer(rebasing: bytes[offset ..< offset + length])))
                offset += length
            } else {
                startBody(length)
            }
        }
        return offset
    }

    /// Allocates the body at its full length. The bytes are uninitialised
    /// until received; the array is never read before `filled == expected`.
    private mutating func startBody(_ length: Int) {
        expected = length
        filled = 0
        // SAFETY: UInt8 is trivial; every byte is written (by `feed` or through
        // `bodyRegion`) before the array is handed out.
        body = [UInt8](unsafeUninitializedCapacity: length) { _, count in count = length }
    }

    private mutating func takeBody() -> [UInt8] {
        let frame = body
        body = []
        filled = 0
        expected = nil
        return frame
    }

    /// Zero-copy reads: while a body of which at least `minimum` bytes are
    /// missing is being gathered, the place where the next bytes belong, so
    /// a socket read can land there directly. Report them with `bodyReceived`
    /// before any other call.
    ///
    /// The pointer stays valid until the next mutating call: `body` is held
    /// only here, so it is uniquely referenced and never reallocated while
    /// being filled.
    mutating func bodyRegion(minimum: Int) -> UnsafeMutableRawBufferPointer? {
        guard let want = expected, want - filled >= minimum else { return nil }
        let at = filled
        // SAFETY: the escaping pointer is used only until `bodyReceived`, and
        // nothing copies or resizes `body` in between (see above).
        return body.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[at...]) }
    }

    /// `n` bytes were written into the region `bodyRegion` returned.
    mutating func bodyReceived(_ n: Int, deliver: ([UInt8]) -> Void) {
        guard let want = expected else { return }
        precondition(n >= 0 && filled + n <= want, "bodyReceived: more bytes than the region held")
        filled += n
        if filled == want { deliver(takeBody()) }
    }

    /// Accepts the oversized announcement that stopped decoding if it now fits
    /// `maxFrameSize`. Returns false (and changes nothing) if it still does not.
    public mutating func resume() -> Bool {
        guard let length = oversizedAnnouncement else { return true }
        guard length <= maxFrameSize else { return false }
        oversizedAnnouncement = nil
        if length == 0 { return true }
        startBody(length)
        return true
    }

    /// Convenience for tests and the fuzz target: decodes `bytes`, returns the
    /// complete frames, and throws `frameTooLarge` if a header is over the limit.
    public mutating func feed(_ bytes: [UInt8]) throws(Failure) -> [[UInt8]] {
        var frames: [[UInt8]] = []
        bytes.withUnsafeBytes { _ = feed($0) { frames.append($0) } }
        if let n = oversizedAnnouncement { throw .frameTooLarge(announced: n, limit: maxFrameSize) }
        return frames
    }

    /// Call at end of stream: throws if a partial frame is buffered.
    public func finish() throws(Failure) {
        if let n = oversizedAnnouncement { throw .frameTooLarge(announced: n, limit: maxFrameSize) }
        if let want = expected {
            throw .closedMidFrame(received: Self.headerSize + filled, expected: Self.headerSize + want)
        }
        if headerBytes > 0 {
            throw .closedMidFrame(received: headerBytes, expected: Self.headerSize)
        }
    }

    /// The 4-byte big-endian length prefix for a frame of `length` bytes.
    /// Frames longer than `UInt32.max` cannot be expressed on the wire.
    public static func header(forLength length: Int) -> (UInt8, UInt8, UInt8, UInt8) {
        precondition(length >= 0 && length <= Int(UInt32.max), "frame length \(length) does not fit the 32-bit prefix")
        let n = UInt32(length)
        return (UInt8(n >> 24), UInt8(truncatingIfNeeded: n >> 16), UInt8(truncatingIfNeeded: n >> 8), UInt8(truncatingIfNeeded: n))
    }

    /// Encodes one frame (prefix and payload) into a new buffer. For tests and
    /// for transports that cannot gather-write.
    public static func encode(_ payload: [UInt8]) -> [UInt8] {
        let h = header(forLength: payload.count)
        var out: [UInt8] = [h.0, h.1, h.2, h.3]
        out.reserveCapacity(headerSize + payload.count)
        out.append(contentsOf: payload)
        return out
    }
}
