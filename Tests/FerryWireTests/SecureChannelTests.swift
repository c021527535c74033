import Testing
@testable import FerryWire

/// A transport between the channel and the pair that lets a test rewrite frames.
final class TamperingTransport: FrameTransport, @unchecked Sendable {
    // Invariant: `rewrite` is set before the channel sends data and read only by the
    // single receiving task afterwards.
    let inner: FrameTransport
    var rewrite: (@Sendable ([[UInt8]]) -> [[UInt8]])? = nil
    var held: [[UInt8]] = []
    var batch = 1
    init(_ inner: FrameTransport) { self.inner = inner }
    func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    func receive() async throws -> [UInt8]? {
        guard let rewrite else { return try await inner.receive() }
        while held.isEmpty {
            var got: [[UInt8]] = []
            for _ in 0..<batch { guard let f = try await inner.receive() else { break }; got.append(f) }
            if got.isEmpty { return nil }
            held = rewrite(got)
        }
        return held.removeFirst()
    }
    func setMaxIncomingFrameSize(_ bytes: Int) { inner.setMaxIncomingFrameSize(bytes) }
    func close() { inner.close() }
    var peerDescription: String { inner.peerDescription }
}

func securePair(options: SecureChannelOptions = .init()) async throws -> (SecureChannel, SecureChannel, TamperingTransport) {
    let (a, b) = InMemoryTransport.pair(names: ("leecher-end", "seeder-end"))
    let tb = TamperingTransport(b)
    let psk = try PreSharedSecret.generate()
    async let s = SecureChannel.server(over: tb, credentials: .preSharedSecret(psk), options: options)
    async let c = SecureChannel.client(over: a, credentials: .preSharedSecret(psk), options: options)
    return (try await c, try await s, tb)
}

@Suite struct SecureChannelTests {
    @Test func largeFramesRoundTrip() async throws {
        let (c, s, _) = try await securePair()
        let big = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try await c.send(big)
        try await c.send([])
        #expect(try await s.receive() == big)
        #expect(try await s.receive() == [])
    }

    @Test func alteredFrameEndsConnection() async throws {
        let (c, s, t) = try await securePair()
        t.rewrite = { fs in fs.map { var f = $0; f[f.count / 2] ^= 1; return f } }
        try await c.send([1, 2, 3, 4, 5, 6])
        await #expect { try await s.receive() } throws: { "\($0)".contains("frame failed authentication: altered, replayed or reordered") }
        await #expect(throws: SecureChannelError.self) { try await s.receive() }
    }

    @Test func replayedFrameEndsConnection() async throws {
        let (c, s, t) = try await securePair()
        t.rewrite = { fs in [fs[0], fs[0]] }
        try await c.send([7])
        #expect(try await s.receive() == [7])
        await #expect { try await s.receive() } throws: { "\($0)".contains("altered, replayed or reordered") }
    }

    @Test func reorderedFramesEndConnection() async throws {
        let (c, s, t) = try await securePair()
        t.batch = 2
        t.rewrite = { fs in fs.reversed() }
        try await c.send([1]); try await c.send([2])
        await #expect { try await s.receive() } throws: { "\($0)".contains("altered, replayed or reordered") }
    }

    @Test func truncatedRecordEndsConnection() async throws {
        let (c, s, t) = try await securePair()
        t.rewrite = { fs in fs.map { Array($0.prefix(5)) } }
        try await c.send([1, 2, 3])
        await #expect { try await s.receive() } throws: { "\($0)".contains("frame failed authentication: truncated") }
    }

    @Test func truncatedStreamIsReported() async throws {
        let (c, s, _) = try await securePair()
        try await c.send([1])
        c.transport.close()   // no close record
        #expect(try await s.receive() == [1])
        await #expect { try await s.receive() } throws: { "\($0)".contains("without an authenticated close record") }
    }

    @Test func gracefulCloseEndsWithNil() async throws {
        let (c, s, _) = try await securePair()
        try await c.send([1])
        await c.closeGracefully()
        #expect(try await s.receive() == [1])
        #expect(try await s.receive() == nil)
    }

    @Test func oversizedFrameIsRefusedBeforeAllocation() async throws {
        var o = SecureChannelOptions(); o.maxIncomingPayload = 1000
        let (c, s, _) = try await securePair(options: o)
        try await c.send([UInt8](repeating: 0, count: 1001))
        await #expect { try await s.receive() } throws: { "\($0)".contains("over the limit") }
    }

    @Test func rekeysWithSmallLimit() async throws {
        var o = SecureChannelOptions(); o.rekeyRecords = 3; o.rekeyBytes = 100
        let (c, s, _) = try await securePair(options: o)
        for i in 0..<20 {
            let payload = [UInt8](repeating: UInt8(i), count: i * 7)
            try await c.send(payload)
            #expect(try await s.receive() == payload)
            try await s.send(payload)
            #expect(try await c.receive() == payload)
        }
        #expect(c.sendEpoch >= 6)
        #expect(c.sendEpoch == s.receiveEpoch)
        #expect(s.sendEpoch == c.receiveEpoch)
    }

    @Test func rekeyMismatchFailsAuthentication() async throws {
        // A peer that ratchets at a different point cannot read the next record.
        var o = SecureChannelOptions(); o.rekeyRecords = 2
        let (a, b) = InMemoryTransport.pair()
        let psk = try PreSharedSecret.generate()
        async let sv = SecureChannel.server(over: b, credentials: .preSharedSecret(psk))
        async let cl = SecureChannel.client(over: a, credentials: .preSharedSecret(psk), options: o)
        let (c, s) = (try await cl, try await sv)
        for _ in 0..<2 { try await c.send([1]); _ = try await s.receive() }
        try await c.send([1])
        await #expect(throws: SecureChannelError.self) { try await s.receive() }
    }

    @Test func concurrentSendersStayOrderedPerSender() async throws {
        let (c, s, _) = try await securePair()
        try await withThrowingTaskGroup(of: Void.self) { g in
            for sender in 0..<8 {
                g.addTask { for i in 0..<50 { try await c.send([UInt8(sender), UInt8(i)] + [UInt8](repeating: 0, count: 3000)) } }
            }
            var next = [Int](repeating: 0, count: 8)
            for _ in 0..<400 {
                let f = try #require(try await s.receive())
                #expect(Int(f[1]) == next[Int(f[0])])
                next[Int(f[0])] += 1
            }
            try await g.waitForAll()
        }
    }
}

@Suite struct SecureChannelOverTCPTests {
    @Test func handshakeAndRPCOverLoopbackTCP() async throws {
        let listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let k = TestKeys()
        async let accepted = listener.accept()
        let clientTransport = try await Transports.connect(to: listener.endpoint, timeout: .seconds(5))
        let serverTransport = try await accepted
        async let s = SecureChannel.server(over: serverTransport, credentials: k.seederCreds)
        let client = try await SecureChannel.client(over: clientTransport, credentials: k.leecherCreds)
        let server = try await s
        let rpcServer = RPCServer(transport: server) { _, p, parts in
            try await parts.send([UInt8](repeating: 1, count: 2 << 20))
            return p
        }
        let serving = Task { try await rpcServer.run() }
        let rpc = RPCClient(transport: client)
        let r = try await rpc.call(0x100, [5, 6])
        #expect(r.count == (2 << 20) + 2 && r.suffix(2) == [5, 6])
        rpc.close()
        try await serving.value
    }

    @Test func unknownKeyOverTCPIsReportedOnBothSides() async throws {
        let listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        defer { listener.close() }
        let k = TestKeys()
        async let accepted = listener.accept()
        let clientTransport = try await Transports.connect(to: listener.endpoint, timeout: .seconds(5))
        let serverTransport = try await accepted
        let stranger = Credentials.keys(k.stranger, authorized: AuthorizedKeys([]), pinnedPeer: k.seeder.publicKey)
        async let s = Result { try await SecureChannel.server(over: serverTransport, credentials: k.seederCreds) }
        let c = await Result { try await SecureChannel.client(over: clientTransport, credentials: stranger) }
        #expect(errorText(c).contains("the seeder rejected our key: not in its authorized list"), "\(errorText(c))")
        #expect(errorText(await s).contains("is not in our authorized list"))
    }
}

/// The open-ahead pipeline (records of 64 KiB or more opened by parallel tasks).
@Suite struct OpenAheadTests {
    func options(_ ahead: Int) -> SecureChannelOptions {
        var o = SecureChannelOptions(); o.openAhead = ahead; return o
    }
    func frame(_ i: Int) -> [UInt8] {
        let n = i % 3 == 0 ? 100 + i : (64 << 10) + i * 1000
        return [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: n)
    }

    @Test(arguments: [1, 3]) func deliversInOrderAndEndsCleanly(ahead: Int) async throws {
        let (c, s, _) = try await securePair(options: options(ahead))
        async let sending: Void = { for i in 0..<40 { try await c.send(frame(i)) }; await c.closeGracefully() }()
        for i in 0..<40 { #expect(try await s.receive() == frame(i), "frame \(i)") }
        #expect(try await s.receive() == nil)
        #expect(try await s.receive() == nil)
        try await sending
    }

    @Test(arguments: [1, 3]) func alteredLargeRecordEndsConnection(ahead: Int) async throws {
        let (c, s, t) = try await securePair(options: options(ahead))
        let n = Locked(0)
        t.rewrite = { fs in fs.map { f in
            let k = n.withLock { $0 += 1; return $0 }
            var f = f; if k == 5 { f[f.count / 2] ^= 0x40 }; return f
        } }
        for i in 1..<9 { try await c.send(frame(i)) }
        for i in 1..<5 { #expect(try await s.receive() == frame(i)) }
        await #expect { try await s.receive() } throws: { "\($0)".contains("frame failed authentication: altered, replayed or reordered (record 4") }
        await #expect(throws: SecureChannelError.self) { try await s.receive() }
    }

    @Test func replayedLargeRecordEndsConnection() async throws {
        let (c, s, t) = try await securePair(options: options(2))
        t.rewrite = { fs in [fs[0], fs[0]] }
        try await c.send(frame(1))
        #expect(try await s.receive() == frame(1))
        await #expect { try await s.receive() } throws: { "\($0)".contains("altered, replayed or reordered") }
    }

    @Test func truncatedStreamIsReported() async throws {
        let (c, s, _) = try await securePair(options: options(2))
        try await c.send(frame(1))
        c.transport.close()
        #expect(try await s.receive() == frame(1))
        await #expect { try await s.receive() } throws: { "\($0)".contains("without an authenticated close record") }
    }

    @Test func rekeysInOrder() async throws {
        var o = options(3); o.rekeyRecords = 3; o.rekeyBytes = 200_000
        let (c, s, _) = try await securePair(options: o)
        async let sending: Void = { for i in 0..<30 { try await c.send(frame(i)) } }()
        for i in 0..<30 { #expect(try await s.receive() == frame(i)) }
        try await sending
        #expect(c.sendEpoch == s.receiveEpoch && c.sendEpoch >= 9)
    }

    @Test func localCloseStopsTheProducer() async throws {
        let (c, s, _) = try await securePair(options: options(2))
        for i in 1..<6 { try await c.send(frame(i)) }   // more than the pipeline holds
        #expect(try await s.receive() == frame(1))
        s.close()
        // Buffered records may still come out; then the end. Never a hang.
        var ended = false
        for _ in 0..<6 { if (try? await s.receive()) == nil { ended = true; break } }
        #expect(ended)
    }
}
