import Testing
import Synchronization
@testable import FerryWire

/// A client and a running server over an in-memory pair (optionally secured).
func rpcPair(secure: Bool = false, openAhead: Int = 0, options: RPCOptions = .init(), handler: @escaping RPCServer.Handler) async throws
    -> (client: RPCClient, server: RPCServer, done: Task<Error?, Never>) {
    let (a, b) = InMemoryTransport.pair(names: ("leecher-end", "seeder-end"))
    var ct: FrameTransport = a, st: FrameTransport = b
    if secure {
        let psk = try PreSharedSecret.generate()
        var co = SecureChannelOptions(); co.openAhead = openAhead
        async let s = SecureChannel.server(over: b, credentials: .preSharedSecret(psk), options: co)
        async let c = SecureChannel.client(over: a, credentials: .preSharedSecret(psk), options: co)
        (ct, st) = (try await c, try await s)
    }
    let server = RPCServer(transport: st, options: options, handler: handler)
    let done = Task { () -> Error? in
        do { try await server.run(); return nil } catch { return error }
    }
    return (RPCClient(transport: ct, options: options), server, done)
}

/// Sends `frame`, or gives up after two seconds (the peer stopped reading).
func sendsWithin(_ transport: FrameTransport, _ frame: [UInt8]) async -> Bool {
    (try? await withThrowingTaskGroup(of: Bool.self) { group in
        group.addTask { try await transport.send(frame); return true }
        group.addTask { try await Task.sleep(for: .seconds(2)); return false }
        defer { group.cancelAll() }
        return try await group.next()!
    }) ?? false
}

/// A Sendable box around a Mutex, so test closures can share state.
final class Locked<T: Sendable>: Sendable {
    let m: Mutex<T>
    init(_ v: T) { m = Mutex(v) }
    func withLock<R>(_ body: (inout T) -> R) -> R { m.withLock { body(&$0) } }
}

let echo: RPCServer.Handler = { method, payload, _ in payload + [UInt8(truncatingIfNeeded: method)] }

@Suite struct RPCTests {
    @Test func unaryRoundTrip() async throws {
        let (c, _, done) = try await rpcPair(handler: echo)
        #expect(try await c.call(0x100, [1, 2]) == [1, 2, 0])
        c.close()
        #expect(await done.value == nil)
    }

    @Test(arguments: [false, true]) func pipelinesManyRequests(secure: Bool) async throws {
        let (c, server, _) = try await rpcPair(secure: secure) { m, p, _ in
            try await Task.sleep(for: .milliseconds(20))   // all must be in flight together
            return p
        }
        let peak = Locked(0)
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0..<512 {
                g.addTask {
                    let p = [UInt8(i & 255), UInt8(i >> 8)]
                    let r = try await c.call(0x100, p)
                    #expect(r == p)
                }
            }
            g.addTask { for _ in 0..<10 { try await Task.sleep(for: .milliseconds(2)); let n = server.inFlight; peak.withLock { $0 = max($0, n) } } }
            try await g.waitForAll()
        }
        #expect(peak.withLock { $0 } >= 256)
        c.close()
    }

    @Test func responsesArriveOutOfOrder() async throws {
        // Handlers finish in the order the test releases them, not the request order.
        let released = Locked<Set<UInt8>>([])
        let (c, server, _) = try await rpcPair { _, p, _ in
            while !released.withLock({ $0.contains(p[0]) }) { try await Task.sleep(for: .milliseconds(1)) }
            return p
        }
        let order = Locked<[UInt8]>([])
        try await withThrowingTaskGroup(of: Void.self) { g in
            for d in [1, 3, 5] as [UInt8] {
                g.addTask { let r = try await c.call(0x100, [d]); order.withLock { $0.append(r[0]) } }
            }
            for _ in 0..<2000 where server.inFlight < 3 { try await Task.sleep(for: .milliseconds(1)) }
            for (n, d) in ([5, 1, 3] as [UInt8]).enumerated() {
                released.withLock { _ = $0.insert(d) }
                for _ in 0..<2000 where order.withLock({ $0.count }) <= n { try await Task.sleep(for: .milliseconds(1)) }
            }
            try await g.waitForAll()
        }
        #expect(order.withLock { $0 } == [5, 1, 3])
    }

    @Test(arguments: [(false, 0), (true, 0), (true, 2)]) func streamsSeveralMiB(secure: Bool, openAhead: Int) async throws {
        let partSize = 3 << 20
        let (c, _, _) = try await rpcPair(secure: secure, openAhead: openAhead) { _, p, parts in
            for i in 0..<Int(p[0]) { try await parts.send([UInt8](repeating: UInt8(i), count: partSize)) }
            return [0xEE]
        }
        var got: [[UInt8]] = []
        for try await part in c.callStreaming(0x100, [4]) { got.append(part) }
        #expect(got.count == 5)
        for i in 0..<4 { #expect(got[i].count == partSize && got[i].first == UInt8(i) && got[i].last == UInt8(i)) }
        #expect(got[4] == [0xEE])
        // A unary call concatenates the parts.
        let all = try await c.call(0x100, [2])
        #expect(all.count == 2 * partSize + 1)
    }

    @Test func clientVanishingMidStreamEndsTheServer() async throws {
        // Bulk parts over a secure channel take the parallel-sealing path; a
        // client that disappears must end the server, not hang it.
        let started = Locked(false)
        let (c, _, done) = try await rpcPair(secure: true) { _, _, parts in
            started.withLock { $0 = true }
            for _ in 0..<10_000 { try await parts.send([UInt8](repeating: 9, count: 1 << 20)) }
            return []
        }
        let stream = c.callStreaming(0x100, [])
        var n = 0
        for try await _ in stream { n += 1; if n == 3 { break } }
        c.close()
        let outcome = await done.value   // returns or throws; must not hang
        _ = outcome
        #expect(started.withLock { $0 })
    }

    @Test func errorRepliesCarryCodes() async throws {
        let (c, _, _) = try await rpcPair { m, _, _ in
            if m == 0x101 { throw RPCError(RPCErrorCode(0x0123), "no such region 0x7f00") }
            if m == 0x102 { struct Boom: Error {}; throw Boom() }
            throw RPCError(.unknownMethod, "method \(m) is not served")
        }
        await #expect { try await c.call(0x101, []) } throws: { e in
            let e = e as! RPCError; return e.code.rawValue == 0x0123 && e.message.contains("no such region 0x7f00")
        }
        await #expect { try await c.call(0x102, []) } throws: { ($0 as! RPCError).code == .internalError }
        await #expect { try await c.call(0x555, []) } throws: { ($0 as! RPCError).code == .unknownMethod }
        // The connection survives error replies.
        await #expect { try await c.call(0x555, []) } throws: { ($0 as! RPCError).message.contains("not served") }
    }

    @Test func cancellationReachesTheHandler() async throws {
        let cancelled = Locked(false)
        let (c, server, _) = try await rpcPair { _, _, _ in
            do { try await Task.sleep(for: .seconds(30)) } catch { cancelled.withLock { $0 = true }; throw error }
            return []
        }
        let call = Task { try await c.call(0x100, []) }
        for _ in 0..<400 where server.inFlight == 0 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(server.inFlight == 1)
        call.cancel()
        await #expect(throws: CancellationError.self) { try await call.value }
        for _ in 0..<100 where !cancelled.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(5)) }
        #expect(cancelled.withLock { $0 })
        #expect(server.inFlight == 0)
        #expect(c.inFlight == 0)
    }

    @Test func abandoningAStreamCancelsIt() async throws {
        let cancelled = Locked(false)
        let (c, _, _) = try await rpcPair { _, _, parts in
            do { for _ in 0..<1000 { try await parts.send([1]); try await Task.sleep(for: .milliseconds(5)) } }
            catch { cancelled.withLock { $0 = true }; throw error }
            return []
        }
        for try await _ in c.callStreaming(0x100, []) { break }
        for _ in 0..<100 where !cancelled.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(5)) }
        #expect(cancelled.withLock { $0 })
    }

    @Test func keepaliveHoldsAnIdleConnection() async throws {
        // Pings must flow while the client is idle, and the connection must stay up.
        var o = RPCOptions(); o.keepaliveInterval = .milliseconds(20); o.idleTimeout = .seconds(30)
        let (a, b) = InMemoryTransport.pair(names: ("client", "server"))
        let counted = CountingTransport(b)
        let server = RPCServer(transport: counted, options: o, handler: echo)
        let done = Task { () -> Error? in do { try await server.run(); return nil } catch { return error } }
        let c = RPCClient(transport: a, options: o)
        for _ in 0..<1000 where counted.received.withLock({ $0 }) < 3 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(counted.received.withLock { $0 } >= 3, "the idle client sent no pings")
        #expect(try await c.call(0x100, [1]) == [1, 0])
        c.close()
        // The client's close may race a ping in flight: the server then ends
        // on the closed transport rather than at a frame boundary. Either is a
        // clean end; an idle timeout or a protocol error is not.
        let ended = await done.value
        #expect(ended == nil || "\(ended!)".lowercased().contains("closed"), "\(String(describing: ended))")
    }

    /// A peer that pings (or floods requests past the in-flight limit) and
    /// never reads the answers: the answers wait in a bounded queue, and the
    /// connection ends with an error that says why, on both sides.
    @Test func aPeerThatPingsWithoutReadingIsCutOff() async throws {
        var o = RPCOptions(); o.maxQueuedControlFrames = 64
        // Tiny buffers, so the unread answers back up into the outbox.
        let (a, b) = InMemoryTransport.pair(capacityFrames: 4, capacityBytes: 4096, names: ("hostile-client", "server"))
        let server = RPCServer(transport: b, options: o, handler: echo)
        let done = Task { () -> Error? in do { try await server.run(); return nil } catch { return error } }
        var sent = 0
        while sent < 10_000, await sendsWithin(a, RPCMessage.frame(.ping, id: UInt32(sent))) { sent += 1 }
        let ended = await done.value
        #expect(sent < 10_000, "the server kept reading pings it could not answer")
        #expect("\(String(describing: ended))".contains("hostile-client keeps sending pings or requests beyond the limit without reading the answers"))

        // The same for a client: a server that pings and never reads.
        let (x, y) = InMemoryTransport.pair(capacityFrames: 4, capacityBytes: 4096, names: ("client", "hostile-server"))
        let client = RPCClient(transport: x, options: o)
        let call = Task { try await client.call(0x100, []) }
        _ = try await y.receive()
        for i in 0..<2000 where await sendsWithin(y, RPCMessage.frame(.ping, id: UInt32(i))) == false { break }
        await #expect { try await call.value } throws: { e in
            "\(e)".contains("hostile-server keeps sending pings or requests beyond the limit without reading the answers")
        }
    }

    @Test func idleTimeoutClosesASilentPeer() async throws {
        var o = RPCOptions(); o.keepaliveInterval = .milliseconds(20); o.idleTimeout = .milliseconds(100)
        let (a, _) = InMemoryTransport.pair(names: ("client", "silent-peer"))
        let c = RPCClient(transport: a, options: o)
        await #expect { try await c.call(0x100, []) } throws: { e in
            let e = e as! RPCError; return e.code == .idleTimeout && e.message.contains("nothing received from silent-peer")
        }
        // A silent client makes the server give up too.
        let (x, y) = InMemoryTransport.pair(names: ("silent-client", "server"))
        let server = RPCServer(transport: y, options: o, handler: echo)
        await #expect { try await server.run() } throws: { ($0 as! RPCError).code == .idleTimeout }
        _ = x
    }

    @Test func serverClosingFailsOutstandingCalls() async throws {
        let (a, b) = InMemoryTransport.pair(names: ("client", "server"))
        let c = RPCClient(transport: a)
        let call = Task { try await c.call(0x100, []) }
        _ = try await b.receive()
        b.close()
        await #expect { try await call.value } throws: { e in
            let e = e as! RPCError; return e.code == .connectionClosed && e.message.contains("server closed the connection")
        }
    }

    @Test func malformedFramesEndTheServer() async throws {
        let (a, b) = InMemoryTransport.pair()
        let server = RPCServer(transport: b, handler: echo)
        try await a.send([0x01, 0, 0, 0, 0, 1, 1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 1])   // length over the limit
        await #expect { try await server.run() } throws: { "\($0)".contains("over the limit") }
        let (x, y) = InMemoryTransport.pair()
        try await x.send([9])
        await #expect { try await RPCServer(transport: y, handler: echo).run() } throws: { "\($0)".contains("encoding version 9") }
    }

    @Test func clientWaitsForAnInFlightSlot() async throws {
        var o = RPCOptions(); o.maxInFlight = 4
        let peak = Locked(0)
        let (c, server, _) = try await rpcPair(options: o) { _, p, _ in
            try await Task.sleep(for: .milliseconds(5))
            return p
        }
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0..<40 { g.addTask { let r = try await c.call(0x100, [UInt8(i)]); #expect(r == [UInt8(i)]) } }
            g.addTask { for _ in 0..<50 { let n = server.inFlight; peak.withLock { $0 = max($0, n) }; try await Task.sleep(for: .milliseconds(1)) } }
            try await g.waitForAll()
        }
        #expect(peak.withLock { $0 } <= 4)
        #expect(c.inFlight == 0)
    }

    @Test func waitingForASlotIsCancellable() async throws {
        var o = RPCOptions(); o.maxInFlight = 1
        let (c, server, _) = try await rpcPair(options: o) { _, _, _ in try await Task.sleep(for: .seconds(30)); return [] }
        let first = Task { try await c.call(0x100, []) }
        for _ in 0..<400 where server.inFlight == 0 { try await Task.sleep(for: .milliseconds(5)) }
        let second = Task { try await c.call(0x100, []) }
        try await Task.sleep(for: .milliseconds(20))
        second.cancel()
        await #expect(throws: CancellationError.self) { try await second.value }
        first.cancel()
        await #expect(throws: CancellationError.self) { try await first.value }
        #expect(c.inFlight == 0)
    }

    @Test func overloadedBeyondServerLimit() async throws {
        var so = RPCOptions(); so.maxInFlight = 4
        let (a, b) = InMemoryTransport.pair()
        let server = RPCServer(transport: b, options: so) { _, _, _ in try await Task.sleep(for: .milliseconds(200)); return [] }
        Task { try await server.run() }
        let c = RPCClient(transport: a)
        let results = await withTaskGroup(of: RPCErrorCode?.self) { g in
            for _ in 0..<6 { g.addTask { do { _ = try await c.call(0x100, []); return nil } catch { return (error as? RPCError)?.code } } }
            var r: [RPCErrorCode?] = []
            for await x in g { r.append(x) }
            return r
        }
        #expect(results.filter { $0 == .overloaded }.count == 2)
    }
}

/// Counts frames received through it.
final class CountingTransport: FrameTransport {
    let inner: FrameTransport
    let received = Locked(0)
    init(_ inner: FrameTransport) { self.inner = inner }
    func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    func receive() async throws -> [UInt8]? {
        let f = try await inner.receive()
        if f != nil { received.withLock { $0 += 1 } }
        return f
    }
    func setMaxIncomingFrameSize(_ bytes: Int) { inner.setMaxIncomingFrameSize(bytes) }
    func close() { inner.close() }
    var peerDescription: String { inner.peerDescription }
}
