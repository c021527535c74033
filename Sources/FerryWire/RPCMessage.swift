// The RPC's binary encoding (Protocols/wire.md § RPC messages): a frame holds
// one encoding-version byte and then one or more messages, each a 12-byte
// header and a payload. Lengths are checked against the limits before any
// payload is copied.

/// RPC message types (wire.md § Registries).
public enum RPCMessageType: UInt8, Sendable {
    case request = 0x01
    case response = 0x02
    case part = 0x03
    case error = 0x04
    case cancel = 0x05
    case ping = 0x06
    case pong = 0x07
}

/// Error codes carried by error replies (wire.md § RPC error codes). Codes
/// 0x0001–0x00FF belong to the wire; 0x0100–0x7FFF to the application
/// (FerryMigration); 0xFF00–0xFFFF are local only and never sent.
public struct RPCErrorCode: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ v: UInt16) { rawValue = v }

    public static let unknownMethod = RPCErrorCode(0x0001)
    public static let badRequest = RPCErrorCode(0x0002)
    public static let internalError = RPCErrorCode(0x0003)
    public static let cancelled = RPCErrorCode(0x0004)
    public static let overloaded = RPCErrorCode(0x0005)
    public static let tooLarge = RPCErrorCode(0x0006)
    public static let unavailable = RPCErrorCode(0x0007)
    // Local only.
    public static let connectionClosed = RPCErrorCode(0xFF00)
    public static let protocolError = RPCErrorCode(0xFF01)
    public static let idleTimeout = RPCErrorCode(0xFF02)

    public var description: String {
        switch self {
        case .unknownMethod: return "unknown method"
        case .badRequest: return "bad request"
        case .internalError: return "internal error"
        case .cancelled: return "cancelled"
        case .overloaded: return "overloaded"
        case .tooLarge: return "too large"
        case .unavailable: return "unavailable"
        case .connectionClosed: return "connection closed"
        case .protocolError: return "protocol error"
        case .idleTimeout: return "idle timeout"
        default: return "error \(rawValue)"
        }
    }
}

/// A typed error: sent by a handler, or raised locally when the connection fails.
public struct RPCError: Error, CustomStringConvertible, Sendable {
    public var code: RPCErrorCode
    public var message: String
    public init(_ code: RPCErrorCode, _ message: String) { self.code = code; self.message = message }
    public init(code: RPCErrorCode, message: String) { self.code = code; self.message = message }
    public var description: String { "\(message) (\(code), code \(code.rawValue))" }
}

/// Method numbers: 0 is invalid, 0x0001–0x00FF reserved for the wire,
/// 0x0100–0x7FFF for FerryMigration, 0x8000–0xFFFF private/experimental.
public enum RPCMethodRange {
    public static let reservedForWire: ClosedRange<UInt16> = 0x0001...0x00FF
    public static let application: ClosedRange<UInt16> = 0x0100...0x7FFF
    public static let experimental: ClosedRange<UInt16> = 0x8000...0xFFFF
}

/// Bytes the RPC adds after a one-message payload: the 12-byte message trailer
/// and the encoding-version byte. A payload array with this much spare capacity
/// (`reserveCapacity(count + RPCEncoding.trailerBytes)`) is framed without a copy.
public enum RPCEncoding {
    public static let trailerBytes = RPCMessage.trailerBytes + 1
}

/// One decoded message.
struct RPCMessage: Equatable, Sendable {
    var type: RPCMessageType
    var id: UInt32
    /// Method (request), error code (error), zero otherwise.
    var code: UInt16
    var payload: [UInt8]

    static let encodingVersion: UInt8 = 1
    static let trailerBytes = 12

    /// Encodes a one-message frame: payload || trailer || version. The trailer
    /// follows the payload so that framing appends (no copy when the payload has
    /// spare capacity) and decoding a one-message frame truncates (no copy).
    static func frame(_ type: RPCMessageType, id: UInt32, code: UInt16 = 0, payload: consuming [UInt8] = []) -> [UInt8] {
        var b = consume payload
        let len = UInt32(b.count)
        b.reserveCapacity(b.count + trailerBytes + 2)   // + the record's encoding flag (wire.md § 5.4), appended in place
        b.append(type.rawValue)
        b.append(0)   // flags, reserved
        b.append(UInt8(truncatingIfNeeded: id >> 24)); b.append(UInt8(truncatingIfNeeded: id >> 16))
        b.append(UInt8(truncatingIfNeeded: id >> 8)); b.append(UInt8(truncatingIfNeeded: id))
        b.append(UInt8(truncatingIfNeeded: code >> 8)); b.append(UInt8(truncatingIfNeeded: code))
        b.append(UInt8(truncatingIfNeeded: len >> 24)); b.append(UInt8(truncatingIfNeeded: len >> 16))
        b.append(UInt8(truncatingIfNeeded: len >> 8)); b.append(UInt8(truncatingIfNeeded: len))
        b.append(encodingVersion)
        return b
    }

    /// Joins one-message frames into one frame (their messages in order).
    static func batch(_ frames: some Collection<[UInt8]>) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(frames.reduce(0) { $0 + $1.count })
        for f in frames { out.append(contentsOf: f.dropLast()) }
        out.append(encodingVersion)
        return out
    }

    /// Decodes every message of a frame in order. Each trailer's length is
    /// checked against `maxPayload` and the bytes before it before anything
    /// is copied; a one-message frame becomes its payload by truncation.
    static func decode(frame: consuming [UInt8], maxPayload: Int = WireLimits.maxPayload, _ each: (RPCMessage) throws -> Void) throws {
        var buf = consume frame
        guard let version = buf.last else { throw RPCError(.protocolError, "empty RPC frame") }
        guard version == encodingVersion else {
            throw RPCError(.protocolError, "RPC frame uses encoding version \(version); this side speaks version \(encodingVersion)")
        }
        // Walk trailers from the end; collect (type, id, code, payload range).
        var found: [(RPCMessageType, UInt32, UInt16, Range<Int>)] = []
        var end = buf.count - 1
        if end == 0 { throw RPCError(.protocolError, "RPC frame holds no message") }
        while end > 0 {
            guard end >= trailerBytes else {
                throw RPCError(.protocolError, "malformed wire message: \(end) stray bytes before a message trailer")
            }
            let t = end - trailerBytes
            guard let type = RPCMessageType(rawValue: buf[t]) else {
                throw RPCError(.protocolError, "malformed wire message: unknown RPC message type \(buf[t])")
            }
            guard buf[t + 1] == 0 else { throw RPCError(.protocolError, "malformed wire message: reserved flags set (\(buf[t + 1]))") }
            var id: UInt32 = 0
            for i in 2..<6 { id = id << 8 | UInt32(buf[t + i]) }
            let code = UInt16(buf[t + 6]) << 8 | UInt16(buf[t + 7])
            var len = 0
            for i in 8..<12 { len = len << 8 | Int(buf[t + i]) }
            guard len <= maxPayload else {
                throw RPCError(.protocolError, "malformed wire message: payload of \(len) bytes is over the limit of \(maxPayload)")
            }
            guard len <= t else {
                throw RPCError(.protocolError, "malformed wire message: payload of \(len) bytes but only \(t) bytes precede its trailer")
            }
            found.append((type, id, code, (t - len)..<t))
            end = t - len
        }
        if found.count == 1 {
            let (type, id, code, range) = found[0]
            buf.removeLast(buf.count - range.upperBound)   // O(1): keeps the payload in place
            try each(RPCMessage(type: type, id: id, code: code, payload: buf))
            return
        }
        for (type, id, code, range) in found.reversed() {
            try each(RPCMessage(type: type, id: id, code: code, payload: Array(buf[range])))
        }
    }
}

/// Outgoing messages waiting for the connection's single writer task, which
/// coalesces small ones into one frame (fewer seals and transport writes).
final class Outbox: Sendable {
    private struct State {
        var queue: [[UInt8]] = []
        var bytes = 0
        var writer: CheckedContinuation<[[UInt8]]?, Never>? = nil
        var spaceWaiters: [CheckedContinuation<Void, Error>] = []
        var failure: Error? = nil
        /// Control frames (pongs, overload errors) in `queue`.
        var controlFrames = 0
    }
    private let state = Mutex(State())
    let highWater: Int

    init(highWater: Int) { self.highWater = highWater }

    /// Queues a one-message frame without waiting (small control messages).
    func enqueue(_ frame: [UInt8]) throws {
        let w: CheckedContinuation<[[UInt8]]?, Never>? = try state.withLock { s in
            if let f = s.failure { throw f }
            if let w = s.writer { s.writer = nil; return w }
            s.queue.append(frame); s.bytes += frame.count
            return nil
        }
        w?.resume(returning: [frame])
    }

    /// Queues a control frame the peer's own messages called for, unless
    /// `limit` of them already wait: then the peer is not reading what it
    /// asks for, and the connection must end (the error says so).
    func enqueueControl(_ frame: [UInt8], limit: Int, peer: String) throws {
        let w: CheckedContinuation<[[UInt8]]?, Never>? = try state.withLock { s in
            if let f = s.failure { throw f }
            if let w = s.writer { s.writer = nil; return w }
            guard s.controlFrames < limit else {
                throw RPCError(.protocolError,
                               "\(peer) keeps sending pings or requests beyond the limit without reading the answers (\(limit) queued); connection closed")
            }
            s.queue.append(frame); s.bytes += frame.count; s.controlFrames += 1
            return nil
        }
        w?.resume(returning: [frame])
    }

    /// Queues a frame, first waiting while more than `highWater` bytes are queued.
    func enqueueWithBackpressure(_ frame: [UInt8]) async throws {
        while true {
            let full = try state.withLock { s -> Bool in
                if let f = s.failure { throw f }
                return s.bytes > highWater
            }
            if !full { break }
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                let now: Result<Void, Error>? = state.withLock { s in
                    if let f = s.failure { return .failure(f) }
                    if s.bytes <= highWater { return .success(()) }
                    s.spaceWaiters.append(c)
                    return nil
                }
                if let now { c.resume(with: now) }
            }
        }
        try enqueue(frame)
    }

    /// The writer's side: everything queued, or nil once failed/closed.
    func takeAll() async -> [[UInt8]]? {
        await withCheckedContinuation { (c: CheckedContinuation<[[UInt8]]?, Never>) in
            let now: [[UInt8]]?? = state.withLock { s in
                if !s.queue.isEmpty {
                    let q = s.queue; s.queue = []; s.bytes = 0; s.controlFrames = 0
                    return .some(q)
                }
                if s.failure != nil { return .some(nil) }
                s.writer = c
                return .none
            }
            if let now { c.resume(returning: now) }
        }
    }

    /// Called by the writer after a batch reached the transport.
    func drained() {
        let waiters = state.withLock { s -> [CheckedContinuation<Void, Error>] in
            guard s.bytes <= highWater else { return [] }
            let w = s.spaceWaiters; s.spaceWaiters = []; return w
        }
        for w in waiters { w.resume() }
    }

    func fail(_ error: Error) {
        let (w, waiters) = state.withLock { s -> (CheckedContinuation<[[UInt8]]?, Never>?, [CheckedContinuation<Void, Error>]) in
            if s.failure == nil { s.failure = error }
            let w = s.writer; s.writer = nil
            let ws = s.spaceWaiters; s.spaceWaiters = []
            return (w, ws)
        }
        w?.resume(returning: nil)
        for x in waiters { x.resume(throwing: error) }
    }

    /// The writer loop: batches small frames, sends large ones alone. Returns
    /// when the outbox fails or closes, or the transport fails.
    func runWriter(transport: FrameTransport, batchBytes: Int = WireLimits.batchBytes) async {
        let channel = transport as? SecureChannel
        while var items = await takeAll() {
            var frames: [[UInt8]] = []
            var i = 0
            while i < items.count {
                var j = i + 1
                var size = items[i].count
                if size < batchBytes {
                    while j < items.count, size + items[j].count - 1 <= batchBytes { size += items[j].count - 1; j += 1 }
                }
                if j == i + 1 {
                    // Moved, not copied: a uniquely referenced frame takes the
                    // record's encoding flag in place (SecureChannel.encode).
                    var f: [UInt8] = []
                    swap(&f, &items[i])
                    frames.append(f)
                } else {
                    frames.append(RPCMessage.batch(items[i..<j]))
                }
                i = j
            }
            do {
                if let channel, channel.compression != .off {
                    try await Self.sendCompressed(&frames, channel: channel, batchBytes: batchBytes)
                } else if let channel, frames.count > 1, frames.contains(where: { $0.count >= batchBytes }) {
                    // Several frames, some large: fix their order now, then seal
                    // them concurrently (one child task each, as many cores as
                    // the pool has); the channel sends them in order.
                    let reserved = try frames.map { try channel.reserve(payload: $0) }
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        for r in reserved { group.addTask { try await channel.sendReserved(r) } }
                        try await group.waitForAll()
                    }
                } else {
                    for f in frames { try await transport.send(f) }
                }
            } catch {
                fail(RPCError(.connectionClosed, "sending to \(transport.peerDescription) failed: \(error)"))
                return
            }
            drained()
        }
    }
}

extension Outbox {
    /// Encodes (compresses) the frames concurrently, each taken out of
    /// `frames` so its buffer is uniquely referenced and the encoding flag is
    /// appended in place; then sends them in order, sealing large ones
    /// concurrently as `runWriter` does without compression.
    static func sendCompressed(_ frames: inout [[UInt8]], channel: SecureChannel, batchBytes: Int) async throws {
        if frames.count == 1 {
            let f = frames[0]; frames[0] = []
            try await channel.sendEncoded(await channel.encode(f))
            return
        }
        var encoded = [[UInt8]](repeating: [], count: frames.count)
        await withTaskGroup(of: (Int, [UInt8]).self) { group in
            for i in frames.indices {
                let box = FrameBox(frames[i]); frames[i] = []
                group.addTask { (i, await channel.encode(box.take())) }
            }
            for await (i, e) in group { encoded[i] = e }
        }
        if encoded.contains(where: { $0.count >= batchBytes }) {
            let reserved = try encoded.map { try channel.reserve(payload: $0) }
            try await withThrowingTaskGroup(of: Void.self) { group in
                for r in reserved { group.addTask { try await channel.sendReserved(r) } }
                try await group.waitForAll()
            }
        } else {
            for e in encoded { try await channel.sendEncoded(e) }
        }
    }
}

/// Hands one frame to a child task without a second reference to its buffer
/// (a captured array would be copied when the encoding flag is appended).
///
/// `take()` is called once, by the one task the box was made for; the
/// (uncontended) lock makes the hand-over plainly safe.
private final class FrameBox: Sendable {
    private let frame: Mutex<[UInt8]>
    init(_ frame: consuming [UInt8]) { self.frame = Mutex(frame) }
    func take() -> [UInt8] {
        frame.withLock { frame in
            var out: [UInt8] = []
            swap(&out, &frame)
            return out
        }
    }
}

/// Monotonic nanoseconds for idle tracking.
struct MonotonicClock: Sendable {
    let base = ContinuousClock.now
    var nanoseconds: Int64 {
        base.duration(to: .now).wholeNanoseconds
    }
}

import Synchronization
import FerryToolkit
