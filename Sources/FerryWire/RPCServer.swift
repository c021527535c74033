// The answering side of the RPC (the seeder or a hub): one handler task per
// request, replies in completion order, streamed parts, cancellation,
// keepalive and idle timeout over any FrameTransport.

import Synchronization
import FerryToolkit

/// Streams parts of a response before the handler returns its final payload.
public struct RPCPartWriter: Sendable {
    let id: UInt32
    let outbox: Outbox
    let maxPayload: Int

    /// Sends one part; waits while the connection's send queue is full.
    /// Throws when the request was cancelled or the connection closed.
    public func send(_ part: [UInt8]) async throws {
        try Task.checkCancellation()
        guard part.count <= maxPayload else {
            throw RPCError(.tooLarge, "response part of \(part.count) bytes is over the limit of \(maxPayload); split it")
        }
        try await outbox.enqueueWithBackpressure(RPCMessage.frame(.part, id: id, payload: part))
    }
}

/// The server end of an RPC connection.
public final class RPCServer: Sendable {
    public typealias Handler = @Sendable (_ method: UInt16, _ payload: [UInt8], _ parts: RPCPartWriter) async throws -> [UInt8]

    private struct State {
        var handlers: [UInt32: Task<Void, Never>] = [:]
        var finished = false
    }
    let transport: FrameTransport
    private let options: RPCOptions
    private let handler: Handler
    private let outbox: Outbox
    private let state = Mutex(State())
    private let clock = MonotonicClock()
    private let lastReceive = Atomic<Int64>(0)

    public init(transport: FrameTransport, options: RPCOptions = .init(), handler: @escaping Handler) {
        self.transport = transport
        self.options = options
        self.handler = handler
        self.outbox = Outbox(highWater: options.outboxHighWater)
    }

    /// Requests being handled (for tests and statistics).
    public var inFlight: Int { state.withLock { $0.handlers.count } }

    /// Serves requests until the peer closes (returns) or the connection fails
    /// (throws). Outstanding handlers are cancelled either way.
    public func run() async throws {
        lastReceive.store(clock.nanoseconds, ordering: .relaxed)
        let writer = Task { [outbox, transport] in await outbox.runWriter(transport: transport) }
        let keepalive = Task { await self.keepaliveLoop() }
        defer {
            keepalive.cancel()
            let running = state.withLock { s -> [Task<Void, Never>] in
                s.finished = true
                let h = Array(s.handlers.values); s.handlers = [:]; return h
            }
            for t in running { t.cancel() }
            outbox.fail(RPCError(.connectionClosed, "RPC server for \(transport.peerDescription) stopped"))
            writer.cancel()
            transport.close()
        }
        let peer = transport.peerDescription
        do {
            while true {
                guard let frame = try await transport.receive() else { break }
                lastReceive.store(clock.nanoseconds, ordering: .relaxed)
                try RPCMessage.decode(frame: consume frame, maxPayload: options.maxPayload) { m in
                    switch m.type {
                    case .request: try start(m)
                    case .cancel:
                        let t = state.withLock { $0.handlers.removeValue(forKey: m.id) }
                        t?.cancel()
                    case .ping:
                        try outbox.enqueueControl(RPCMessage.frame(.pong, id: m.id), limit: options.maxQueuedControlFrames,
                                                  peer: peer)
                    case .pong: break
                    case .response, .part, .error:
                        throw RPCError(.protocolError, "\(peer) sent a \(m.type) message to the answering side; only the server sends those")
                    }
                }
            }
        } catch let e as RPCError where e.code == .idleTimeout || e.code == .protocolError {
            throw e
        } catch is CancellationError {
            if let e = idleFailure.withLock({ $0 }) { throw e }
            throw CancellationError()
        } catch {
            if let e = idleFailure.withLock({ $0 }) { throw e }
            throw error
        }
        if let e = idleFailure.withLock({ $0 }) { throw e }
    }

    private let idleFailure = Mutex<RPCError?>(nil)

    private func start(_ m: RPCMessage) throws {
        let id = m.id
        let busy: Bool = try state.withLock { s in
            if s.handlers[id] != nil {
                throw RPCError(.protocolError, "\(transport.peerDescription) reused request id \(id) while it was still running")
            }
            if s.finished { return false }
            if s.handlers.count >= options.maxInFlight { return true }
            // Created under the lock so the entry exists before the task can remove it.
            s.handlers[id] = Task { await self.serve(id: id, method: m.code, payload: m.payload) }
            return false
        }
        if busy {
            try outbox.enqueueControl(RPCMessage.frame(.error, id: id, code: RPCErrorCode.overloaded.rawValue,
                                                       payload: Array("more than \(options.maxInFlight) requests in flight; retry later".utf8)),
                                      limit: options.maxQueuedControlFrames, peer: transport.peerDescription)
        }
    }

    private func serve(id: UInt32, method: UInt16, payload: [UInt8]) async {
        let parts = RPCPartWriter(id: id, outbox: outbox, maxPayload: options.maxPayload)
        var reply: [UInt8]? = nil
        do {
            let result = try await handler(method, payload, parts)
            if result.count > options.maxPayload {
                reply = errorFrame(id, RPCError(.tooLarge, "response of \(result.count) bytes is over the limit of \(options.maxPayload); stream it in parts"))
            } else {
                reply = RPCMessage.frame(.response, id: id, payload: result)
            }
        } catch let e as RPCError {
            reply = errorFrame(id, e)
        } catch {
            if !Task.isCancelled { reply = errorFrame(id, RPCError(.internalError, "\(error)")) }
        }
        // A request the client cancelled gets no reply: the client already forgot it.
        if Task.isCancelled { reply = nil }
        if let reply { try? await outbox.enqueueWithBackpressure(reply) }
        state.withLock { _ = $0.handlers.removeValue(forKey: id) }
    }

    private func errorFrame(_ id: UInt32, _ e: RPCError) -> [UInt8] {
        RPCMessage.frame(.error, id: id, code: e.code.rawValue, payload: Array(Array(e.message.utf8).prefix(4096)))
    }

    private func keepaliveLoop() async {
        let interval = options.keepaliveInterval, limit = options.idleTimeout
        let tick = min(interval, limit / 4)
        var lastPing: Int64 = -(1 << 62)
        let intervalNs = interval.wholeNanoseconds
        while !Task.isCancelled {
            do { try await Task.sleep(for: tick) } catch { return }
            let idleNs = clock.nanoseconds - lastReceive.load(ordering: .relaxed)
            let idle = Duration.nanoseconds(idleNs)
            if idle > limit {
                idleFailure.withLock { $0 = RPCError(.idleTimeout, "nothing received from \(transport.peerDescription) for \(idle) (limit \(limit)); connection closed") }
                transport.close()
                return
            }
            if idle >= interval, clock.nanoseconds - lastPing >= intervalNs {
                lastPing = clock.nanoseconds
                try? outbox.enqueue(RPCMessage.frame(.ping, id: UInt32(truncatingIfNeeded: lastPing)))
            }
        }
    }
}
