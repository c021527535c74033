// An in-memory twin of the socket transports, for tests and role tests: two
// connected endpoints with bounded buffering (backpressure), the close
// semantics of `FrameTransport`, and the frame size limit enforced on receive.

import Synchronization

/// A connected pair of in-memory transports.
public enum InMemoryTransport {
    /// Two endpoints; what one sends the other receives. Each direction buffers
    /// at most `capacityFrames` frames and `capacityBytes` bytes; a sender past
    /// either bound suspends until the receiver catches up.
    public static func pair(
        capacityFrames: Int = 64,
        capacityBytes: Int = 16 << 20,
        names: (String, String) = ("memory-a", "memory-b")
    ) -> (InMemoryEndpoint, InMemoryEndpoint) {
        // A pipe's errors name the side that is not the one seeing them: the
        // writer hears about the reader, the reader about the writer.
        let ab = InMemoryPipe(capacityFrames: capacityFrames, capacityBytes: capacityBytes, writer: names.0, reader: names.1)
        let ba = InMemoryPipe(capacityFrames: capacityFrames, capacityBytes: capacityBytes, writer: names.1, reader: names.0)
        let a = InMemoryEndpoint(outgoing: ab, incoming: ba, peer: names.1)
        let b = InMemoryEndpoint(outgoing: ba, incoming: ab, peer: names.0)
        return (a, b)
    }
}

/// One end of an in-memory pair.
public final class InMemoryEndpoint: FrameTransport {
    let outgoing: InMemoryPipe
    let incoming: InMemoryPipe
    public let peerDescription: String

    init(outgoing: InMemoryPipe, incoming: InMemoryPipe, peer: String) {
        self.outgoing = outgoing
        self.incoming = incoming
        self.peerDescription = peer
    }

    public func send(_ frame: [UInt8]) async throws {
        try await outgoing.push(frame, peer: peerDescription)
    }

    public func receive() async throws -> [UInt8]? {
        try await incoming.pop(peer: peerDescription)
    }

    public func setMaxIncomingFrameSize(_ bytes: Int) {
        incoming.setLimit(bytes)
    }

    public func close() {
        outgoing.closeWriter()
        incoming.closeReader()
    }

    /// Test hook: the frames waiting in the direction toward this endpoint.
    public var bufferedIncomingFrames: Int { incoming.bufferedFrames }
}

/// One direction of a pair: a bounded FIFO with one writer and one reader side.
final class InMemoryPipe: Sendable {
    private struct Waiter { var id: UInt64; var cont: CheckedContinuation<Void, Error> }
    private struct State {
        var frames: [[UInt8]] = []
        var head = 0
        var bytes = 0
        var limit = Int.max
        var writerClosed = false
        var readerClosed = false
        var reader: CheckedContinuation<[UInt8]?, Error>? = nil
        var readerID: UInt64 = 0
        var writers: [Waiter] = []
        var nextID: UInt64 = 1
        var count: Int { frames.count - head }
    }
    private let state = Mutex(State())
    private let capacityFrames: Int
    private let capacityBytes: Int

    private let writerName: String
    private let readerName: String

    init(capacityFrames: Int, capacityBytes: Int, writer: String, reader: String) {
        self.capacityFrames = max(1, capacityFrames)
        self.capacityBytes = max(1, capacityBytes)
        self.writerName = writer
        self.readerName = reader
    }

    var bufferedFrames: Int { state.withLock { $0.count } }

    func setLimit(_ n: Int) { state.withLock { $0.limit = n } }

    func push(_ frame: [UInt8], peer: String) async throws {
        while true {
            // Either deliver now, or wait for room (backpressure).
            enum Step { case done, wait, fail(Error) }
            let step: Step = state.withLock { s in
                if s.writerClosed { return .fail(TransportError.closed(peer: peer)) }
                if s.readerClosed { return .fail(TransportError.peerClosed(peer: peer)) }
                if let r = s.reader {
                    s.reader = nil
                    r.resume(returning: frame)   // resumed under the lock: it only schedules
                    return .done
                }
                // A single frame larger than the buffer is admitted into an empty buffer.
                if s.count > 0 && (s.count >= capacityFrames || s.bytes + frame.count > capacityBytes) {
                    return .wait
                }
                s.frames.append(frame); s.bytes += frame.count
                return .done
            }
            switch step {
            case .done: return
            case .fail(let e): throw e
            case .wait:
                let id = state.withLock { s -> UInt64 in s.nextID += 1; return s.nextID }
                try await withTaskCancellationHandler {
                    try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                        let resumeNow: Error?? = state.withLock { s in
                            if Task.isCancelled { return .some(CancellationError()) }
                            if s.writerClosed { return .some(TransportError.closed(peer: peer)) }
                            if s.readerClosed { return .some(TransportError.peerClosed(peer: peer)) }
                            if s.count < capacityFrames && s.bytes + frame.count <= capacityBytes || s.count == 0 { return .some(nil) }
                            s.writers.append(Waiter(id: id, cont: c))
                            return .none
                        }
                        if let r = resumeNow {
                            if let e = r { c.resume(throwing: e) } else { c.resume() }
                        }
                    }
                } onCancel: {
                    let w: Waiter? = state.withLock { s in
                        guard let i = s.writers.firstIndex(where: { $0.id == id }) else { return nil }
                        return s.writers.remove(at: i)
                    }
                    w?.cont.resume(throwing: CancellationError())
                }
            }
        }
    }

    func pop(peer: String) async throws -> [UInt8]? {
        enum Step { case frame([UInt8]), end, fail(Error), wait }
        let step: Step = state.withLock { s in
            if s.readerClosed { return .end }
            if s.count > 0 {
                let f = s.frames[s.head]
                if f.count > s.limit {
                    failLocked(&s)
                    return .fail(TransportError.frameTooLarge(peer: peer, size: f.count, limit: s.limit))
                }
                s.frames[s.head] = []; s.head += 1; s.bytes -= f.count
                if s.head > 64 && s.head * 2 > s.frames.count { s.frames.removeFirst(s.head); s.head = 0 }
                wakeWritersLocked(&s)
                return .frame(f)
            }
            if s.writerClosed { return .end }
            return .wait
        }
        switch step {
        case .frame(let f): return f
        case .end: return nil
        case .fail(let e): throw e
        case .wait: break
        }
        let id = state.withLock { s -> UInt64 in s.nextID += 1; return s.nextID }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<[UInt8]?, Error>) in
                enum Now { case value([UInt8]?), error(Error), parked }
                let now: Now = state.withLock { s in
                    if Task.isCancelled { return .error(CancellationError()) }
                    if s.readerClosed { return .value(nil) }
                    if s.count > 0 {
                        let f = s.frames[s.head]
                        if f.count > s.limit {
                            failLocked(&s)
                            return .error(TransportError.frameTooLarge(peer: peer, size: f.count, limit: s.limit))
                        }
                        s.frames[s.head] = []; s.head += 1; s.bytes -= f.count
                        wakeWritersLocked(&s)
                        return .value(f)
                    }
                    if s.writerClosed { return .value(nil) }
                    if s.reader != nil { return .error(WireUsageError("two concurrent receive() calls on one in-memory transport")) }
                    s.reader = c; s.readerID = id
                    return .parked
                }
                switch now {
                case .value(let v): c.resume(returning: v)
                case .error(let e): c.resume(throwing: e)
                case .parked: break
                }
            }
        } onCancel: {
            let r: CheckedContinuation<[UInt8]?, Error>? = state.withLock { s in
                guard s.readerID == id, let r = s.reader else { return nil }
                s.reader = nil
                return r
            }
            r?.resume(throwing: CancellationError())
        }
    }

    /// Frame size violation: the receiving side closes, as a socket transport would.
    private func failLocked(_ s: inout State) {
        s.readerClosed = true
        s.frames = []; s.head = 0; s.bytes = 0
        for w in s.writers { w.cont.resume(throwing: TransportError.peerClosed(peer: readerName)) }
        s.writers = []
    }

    private func wakeWritersLocked(_ s: inout State) {
        // Wake everyone; each re-checks for room. Few writers wait at once.
        for w in s.writers { w.cont.resume() }
        s.writers = []
    }

    func closeWriter() {
        state.withLock { s in
            s.writerClosed = true
            if s.count == 0, let r = s.reader { s.reader = nil; r.resume(returning: nil) }
            for w in s.writers { w.cont.resume(throwing: TransportError.closed(peer: readerName)) }
            s.writers = []
        }
    }

    func closeReader() {
        state.withLock { s in
            s.readerClosed = true
            s.frames = []; s.head = 0; s.bytes = 0
            if let r = s.reader { s.reader = nil; r.resume(returning: nil) }
            for w in s.writers { w.cont.resume(throwing: TransportError.peerClosed(peer: readerName)) }
            s.writers = []
        }
    }
}

/// A transport used against its contract (for example two concurrent receivers).
public struct WireUsageError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ d: String) { description = d }
}
