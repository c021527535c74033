// The calling side of the RPC (the leecher, or a hub acting for it): request
// ids, many requests in flight, out-of-order and streamed responses,
// cancellation, keepalive and idle timeout over any FrameTransport.

import Synchronization
import FerryToolkit

/// Limits and timers of an RPC connection (Protocols/wire.md § Limits).
public struct RPCOptions: Sendable {
    /// Requests outstanding at once; `call` waits for a slot beyond this. Servers
    /// answer requests beyond their own limit with `overloaded`.
    public var maxInFlight = WireLimits.maxInFlight
    /// Largest request, response or part payload; checked before copying.
    public var maxPayload = WireLimits.maxPayload
    /// Send a ping after this long without receiving anything.
    public var keepaliveInterval: Duration = .seconds(15)
    /// Close the connection after this long without receiving anything.
    public var idleTimeout: Duration = .seconds(60)
    /// Senders of large responses and parts wait while this many bytes are queued.
    public var outboxHighWater = 16 << 20
    /// Largest total of a unary `call` result assembled from streamed parts.
    public var maxUnaryResponse = 256 << 20
    /// Answers of our own making (pongs, `overloaded` errors) waiting to be
    /// written. A peer that pings or floods requests while it reads none of
    /// them would otherwise grow this queue without bound; past the limit
    /// (about 160 KiB of frames) the connection is closed instead.
    public var maxQueuedControlFrames = 4096

    public init() {}
}

/// The client end of an RPC connection.
public final class RPCClient: Sendable {
    private let core: RPCClientCore

    /// Starts the connection's reader, writer and keepalive tasks at once.
    public init(transport: FrameTransport, options: RPCOptions = .init()) {
        core = RPCClientCore(transport: transport, options: options)
        core.start()
    }

    deinit { core.shutdown(RPCError(.connectionClosed, "RPC client for \(core.transport.peerDescription) was released")) }

    /// Calls `method` and returns its result; streamed parts, if the handler
    /// sends any, are concatenated before the final payload. Cancelling the
    /// calling task sends a cancel message and throws `CancellationError`.
    public func call(_ method: UInt16, _ payload: [UInt8]) async throws -> [UInt8] {
        try await core.call(method, payload)
    }

    /// Calls `method` and yields each streamed part in order, then the final
    /// payload unless it is empty. Ending iteration early cancels the request.
    public func callStreaming(_ method: UInt16, _ payload: [UInt8]) -> AsyncThrowingStream<[UInt8], Error> {
        core.callStreaming(method, payload)
    }

    /// Fails outstanding calls and closes the transport.
    public func close() {
        core.shutdown(RPCError(.connectionClosed, "RPC client for \(core.transport.peerDescription) was closed"))
    }

    /// Requests outstanding (for tests and statistics).
    public var inFlight: Int { core.inFlight }
}

final class RPCClientCore: Sendable {
    private enum Pending {
        case unary(CheckedContinuation<[UInt8], Error>, parts: [UInt8])
        case stream(AsyncThrowingStream<[UInt8], Error>.Continuation)
    }
    private struct State {
        var nextID: UInt32 = 1
        var pending: [UInt32: Pending] = [:]
        var failure: RPCError? = nil
        var slotWaiters: [(id: UInt64, cont: CheckedContinuation<Void, Error>)] = []
        var nextWaiter: UInt64 = 0
        var reserved = 0
        var tasks: [Task<Void, Never>] = []
    }
    let transport: FrameTransport
    private let options: RPCOptions
    private let outbox: Outbox
    private let state = Mutex(State())
    private let clock = MonotonicClock()
    private let lastReceive = Atomic<Int64>(0)

    init(transport: FrameTransport, options: RPCOptions) {
        self.transport = transport
        self.options = options
        self.outbox = Outbox(highWater: options.outboxHighWater)
    }

    var inFlight: Int { state.withLock { $0.pending.count } }

    func start() {
        lastReceive.store(clock.nanoseconds, ordering: .relaxed)
        let writer = Task { [outbox, transport] in
            await outbox.runWriter(transport: transport)
        }
        let reader = Task { await self.readLoop() }
        let keepalive = Task { await self.keepaliveLoop() }
        state.withLock { $0.tasks = [writer, reader, keepalive] }
    }

    // MARK: Calls

    private func acquireSlot() async throws {
        let waiter = state.withLock { s -> UInt64 in s.nextWaiter += 1; return s.nextWaiter }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, Error>) in
                let now: Result<Void, Error>? = state.withLock { s in
                    if let f = s.failure { return .failure(f) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    if s.reserved < options.maxInFlight { s.reserved += 1; return .success(()) }
                    s.slotWaiters.append((waiter, c))
                    return nil
                }
                if let now { c.resume(with: now) }
            }
        } onCancel: {
            let c: CheckedContinuation<Void, Error>? = state.withLock { s in
                guard let i = s.slotWaiters.firstIndex(where: { $0.id == waiter }) else { return nil }
                return s.slotWaiters.remove(at: i).cont
            }
            c?.resume(throwing: CancellationError())
        }
    }

    /// Removes a pending entry and passes its slot on; call under the lock.
    private func finishLocked(_ s: inout State, _ id: UInt32) -> (Pending?, CheckedContinuation<Void, Error>?) {
        guard let p = s.pending.removeValue(forKey: id) else { return (nil, nil) }
        return (p, releaseSlotLocked(&s))
    }

    /// Frees one in-flight slot, or hands it to a waiting caller (resume it outside the lock).
    private func releaseSlotLocked(_ s: inout State) -> CheckedContinuation<Void, Error>? {
        if !s.slotWaiters.isEmpty { return s.slotWaiters.removeFirst().cont }
        s.reserved -= 1
        return nil
    }

    private func allocateIDLocked(_ s: inout State) -> UInt32 {
        repeat {
            s.nextID &+= 1
        } while s.nextID == 0 || s.pending[s.nextID] != nil
        return s.nextID
    }

    func call(_ method: UInt16, _ payload: [UInt8]) async throws -> [UInt8] {
        guard payload.count <= options.maxPayload else {
            throw RPCError(.tooLarge, "request payload of \(payload.count) bytes is over the limit of \(options.maxPayload)")
        }
        try await acquireSlot()
        let id = state.withLock { allocateIDLocked(&$0) }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (c: CheckedContinuation<[UInt8], Error>) in
                let (err, slot): (Error?, CheckedContinuation<Void, Error>?) = state.withLock { s in
                    if let f = s.failure { return (f, nil) }
                    if Task.isCancelled { return (CancellationError(), releaseSlotLocked(&s)) }
                    s.pending[id] = .unary(c, parts: [])
                    return (nil, nil)
                }
                slot?.resume()
                if let err { c.resume(throwing: err); return }
                do { try outbox.enqueue(RPCMessage.frame(.request, id: id, code: method, payload: payload)) }
                catch { complete(id, with: .failure(error)) }
            }
        } onCancel: {
            self.cancel(id)
        }
    }

    func callStreaming(_ method: UInt16, _ payload: [UInt8]) -> AsyncThrowingStream<[UInt8], Error> {
        let (stream, cont) = AsyncThrowingStream.makeStream(of: [UInt8].self)
        guard payload.count <= options.maxPayload else {
            cont.finish(throwing: RPCError(.tooLarge, "request payload of \(payload.count) bytes is over the limit of \(options.maxPayload)"))
            return stream
        }
        // Streams count toward the in-flight total but do not wait for a slot
        // (this function cannot suspend); the server refuses excess with `overloaded`.
        let id: UInt32? = state.withLock { s in
            if s.failure != nil { return nil }
            let id = allocateIDLocked(&s)
            s.reserved += 1
            s.pending[id] = .stream(cont)
            return id
        }
        guard let id else {
            cont.finish(throwing: state.withLock { $0.failure } ?? RPCError(.connectionClosed, "connection closed"))
            return stream
        }
        cont.onTermination = { [weak self] reason in
            if case .cancelled = reason { self?.cancel(id) }
        }
        do { try outbox.enqueue(RPCMessage.frame(.request, id: id, code: method, payload: payload)) }
        catch { complete(id, with: .failure(error)) }
        return stream
    }

    private func cancel(_ id: UInt32) {
        let (p, slot) = state.withLock { s in finishLocked(&s, id) }
        slot?.resume()
        guard let p else { return }
        switch p {
        case .unary(let c, _): c.resume(throwing: CancellationError())
        case .stream(let c): c.finish(throwing: CancellationError())
        }
        try? outbox.enqueue(RPCMessage.frame(.cancel, id: id))
    }

    private func complete(_ id: UInt32, with result: Result<[UInt8], Error>) {
        let (p, slot) = state.withLock { s in finishLocked(&s, id) }
        slot?.resume()
        switch p {
        case .unary(let c, let parts)?:
            switch result {
            case .success(let last): c.resume(returning: parts.isEmpty ? last : parts + last)
            case .failure(let e): c.resume(throwing: e)
            }
        case .stream(let c)?:
            switch result {
            case .success(let last):
                if !last.isEmpty { c.yield(last) }
                c.finish()
            case .failure(let e): c.finish(throwing: e)
            }
        case nil: break   // cancelled locally; late replies are ignored
        }
    }

    private func part(_ id: UInt32, _ payload: [UInt8]) throws {
        enum Action { case none, yield(AsyncThrowingStream<[UInt8], Error>.Continuation), tooBig }
        let action: Action = state.withLock { s in
            switch s.pending[id] {
            case .unary(let c, var parts)?:
                if parts.count + payload.count > options.maxUnaryResponse { return .tooBig }
                s.pending[id] = nil   // keep the buffer uniquely referenced while appending
                parts.append(contentsOf: payload)
                s.pending[id] = .unary(c, parts: parts)
                return .none
            case .stream(let c)?: return .yield(c)
            case nil: return .none
            }
        }
        switch action {
        case .none: break
        case .yield(let c): c.yield(payload)
        case .tooBig:
            complete(id, with: .failure(RPCError(.tooLarge, "streamed response is over \(options.maxUnaryResponse) bytes; use callStreaming")))
            try? outbox.enqueue(RPCMessage.frame(.cancel, id: id))
        }
    }

    // MARK: Connection tasks

    private func readLoop() async {
        let peer = transport.peerDescription
        do {
            while true {
                guard let frame = try await transport.receive() else { break }
                lastReceive.store(clock.nanoseconds, ordering: .relaxed)
                try RPCMessage.decode(frame: consume frame, maxPayload: options.maxPayload) { m in
                    switch m.type {
                    case .response: complete(m.id, with: .success(m.payload))
                    case .part: try part(m.id, m.payload)
                    case .error:
                        let text = Reject.sanitize(m.payload, limit: 4096)
                        complete(m.id, with: .failure(RPCError(RPCErrorCode(m.code), "\(peer): \(text)")))
                    case .ping:
                        try outbox.enqueueControl(RPCMessage.frame(.pong, id: m.id), limit: options.maxQueuedControlFrames,
                                                  peer: peer)
                    case .pong: break
                    case .request, .cancel:
                        throw RPCError(.protocolError, "\(peer) sent a \(m.type) message to the calling side; only the caller sends those")
                    }
                }
            }
            shutdown(RPCError(.connectionClosed, "\(peer) closed the connection"))
        } catch let e as RPCError {
            shutdown(e)
        } catch {
            shutdown(RPCError(.connectionClosed, "connection to \(peer) failed: \(error)"))
        }
    }

    private func keepaliveLoop() async {
        let interval = options.keepaliveInterval, limit = options.idleTimeout
        let tick = min(interval, limit / 4)
        var lastPing: Int64 = -(1 << 62)
        while !Task.isCancelled {
            do { try await Task.sleep(for: tick) } catch { return }
            let idleNs = clock.nanoseconds - lastReceive.load(ordering: .relaxed)
            let idle = Duration.nanoseconds(idleNs)
            if idle > limit {
                shutdown(RPCError(.idleTimeout, "nothing received from \(transport.peerDescription) for \(idle) (limit \(limit)); connection closed"))
                return
            }
            if idle >= interval, clock.nanoseconds - lastPing >= interval.wholeNanoseconds {
                lastPing = clock.nanoseconds
                try? outbox.enqueue(RPCMessage.frame(.ping, id: UInt32(truncatingIfNeeded: lastPing)))
            }
        }
    }

    func shutdown(_ error: RPCError) {
        let (pending, waiters, tasks) = state.withLock { s -> ([UInt32: Pending], [CheckedContinuation<Void, Error>], [Task<Void, Never>]) in
            if s.failure == nil { s.failure = error }
            let p = s.pending; s.pending = [:]
            let w = s.slotWaiters.map(\.cont); s.slotWaiters = []
            let t = s.tasks; s.tasks = []
            s.reserved = 0
            return (p, w, t)
        }
        let e = state.withLock { $0.failure! }
        for (_, p) in pending {
            switch p {
            case .unary(let c, _): c.resume(throwing: e)
            case .stream(let c): c.finish(throwing: e)
            }
        }
        for w in waiters { w.resume(throwing: e) }
        outbox.fail(e)
        for t in tasks { t.cancel() }
        transport.close()
    }
}
