import Testing
@testable import FerryWire

/// Runs both handshake sides over an in-memory pair; returns both results.
func handshake(client: Credentials, server: Credentials, clientOptions: SecureChannelOptions = .init(), serverOptions: SecureChannelOptions = .init())
    async -> (client: Result<SecureChannel, Error>, server: Result<SecureChannel, Error>) {
    let (a, b) = InMemoryTransport.pair(names: ("leecher-end", "seeder-end"))
    async let s = Result { try await SecureChannel.server(over: b, credentials: server, options: serverOptions) }
    async let c = Result { try await SecureChannel.client(over: a, credentials: client, options: clientOptions) }
    return (await c, await s)
}

extension Result where Failure == Error {
    init(catching body: () async throws -> Success) async {
        do { self = .success(try await body()) } catch { self = .failure(error) }
    }
}

func errorText<T>(_ r: Result<T, Error>) -> String {
    if case .failure(let e) = r { return "\(e)" }
    return "(succeeded)"
}

struct TestKeys {
    let seeder = try! KeyPair.generate()
    let leecher = try! KeyPair.generate()
    let stranger = try! KeyPair.generate()
    var seederCreds: Credentials { .keys(seeder, authorized: AuthorizedKeys([leecher.publicKey]), pinnedPeer: nil) }
    var leecherCreds: Credentials { .keys(leecher, authorized: AuthorizedKeys([]), pinnedPeer: seeder.publicKey) }
}

@Suite struct HandshakeTests {
    @Test func preSharedSecretRoundTrip() async throws {
        let psk = try PreSharedSecret.generate()
        let (c, s) = await handshake(client: .preSharedSecret(psk), server: .preSharedSecret(psk))
        let client = try c.get(), server = try s.get()
        #expect(client.transcriptHash == server.transcriptHash)
        #expect(client.peerPublicKey == nil)
        try await client.send([1, 2, 3])
        #expect(try await server.receive() == [1, 2, 3])
        try await server.send([4])
        #expect(try await client.receive() == [4])
    }

    @Test func keyPairRoundTrip() async throws {
        let k = TestKeys()
        let (c, s) = await handshake(client: k.leecherCreds, server: k.seederCreds)
        let client = try c.get(), server = try s.get()
        #expect(client.peerPublicKey == k.seeder.publicKey)
        #expect(server.peerPublicKey == k.leecher.publicKey)
        try await client.send([9])
        #expect(try await server.receive() == [9])
    }

    @Test func clientAuthorizedListWithoutPin() async throws {
        let k = TestKeys()
        let leecher = Credentials.keys(k.leecher, authorized: AuthorizedKeys([k.seeder.publicKey]), pinnedPeer: nil)
        let (c, s) = await handshake(client: leecher, server: k.seederCreds)
        #expect(try c.get().peerPublicKey == k.seeder.publicKey)
        _ = try s.get()
    }

    @Test(arguments: [true, false]) func cipherNegotiation(aes: Bool) async throws {
        let psk = try PreSharedSecret.generate()
        var o = SecureChannelOptions(); o.allowAES = aes
        let (c, s) = await handshake(client: .preSharedSecret(psk), server: .preSharedSecret(psk), clientOptions: o)
        let expected: CipherSuite = aes && CipherSuite.aesAvailable ? .aes256gcm : .xchacha20poly1305
        #expect(try c.get().cipher == expected)
        #expect(try s.get().cipher == expected)
    }

    @Test func wrongSecretRejectedOnBothSides() async throws {
        let (c, s) = await handshake(client: .preSharedSecret(try .generate()), server: .preSharedSecret(try .generate()))
        #expect(errorText(c).contains("pre-shared secrets differ"), "\(errorText(c))")
        #expect(errorText(s).contains("the leecher rejected the connection: the pre-shared secrets differ"), "\(errorText(s))")
    }

    @Test func unknownClientKeyRejectedOnBothSides() async throws {
        let k = TestKeys()
        let stranger = Credentials.keys(k.stranger, authorized: AuthorizedKeys([]), pinnedPeer: k.seeder.publicKey)
        let (c, s) = await handshake(client: stranger, server: k.seederCreds)
        #expect(errorText(c).contains("the seeder rejected our key: not in its authorized list"), "\(errorText(c))")
        #expect(errorText(s).contains("is not in our authorized list"), "\(errorText(s))")
        #expect(errorText(s).contains(k.stranger.publicKey.text))
    }

    @Test func pinnedServerKeyMismatchRejectedOnBothSides() async throws {
        let k = TestKeys()
        let leecher = Credentials.keys(k.leecher, authorized: AuthorizedKeys([]), pinnedPeer: k.stranger.publicKey)
        let (c, s) = await handshake(client: leecher, server: k.seederCreds)
        #expect(errorText(c).contains("does not match the pinned key"), "\(errorText(c))")
        #expect(errorText(s).contains("the leecher rejected our key: it does not match the key it pinned"), "\(errorText(s))")
    }

    @Test func modeMismatchRejectedOnBothSides() async throws {
        let k = TestKeys()
        let (c, s) = await handshake(client: k.leecherCreds, server: .preSharedSecret(try .generate()))
        #expect(errorText(c).contains("other authentication mode"), "\(errorText(c))")
        #expect(errorText(s).contains("expects a pre-shared secret"), "\(errorText(s))")
    }

    @Test func emptyAuthorizedListIsAConfigurationError() async throws {
        let k = TestKeys()
        let (c, s) = await handshake(client: k.leecherCreds, server: .keys(k.seeder, authorized: AuthorizedKeys([]), pinnedPeer: nil))
        #expect(errorText(c).contains("closed the connection"), "\(errorText(c))")   // at once, not after the timeout
        #expect(errorText(s).contains("the authorized list is empty, so every leecher would be rejected"), "\(errorText(s))")
    }

    @Test func unknownVersionIsRejectedClearly() async throws {
        let psk = try PreSharedSecret.generate()
        var hs = try ClientHandshake(credentials: .preSharedSecret(psk), peer: "test")
        var hello = try hs.hello()
        hello[6] = 9   // version 0x0109
        var server = try ServerHandshake(credentials: .preSharedSecret(psk), peer: "client")
        do { _ = try server.handleClientHello(hello); Issue.record("accepted an unknown version") }
        catch let e as HandshakeError {
            #expect(e.failure == .unsupportedVersion)
            #expect("\(e)".contains("speaks wire version 9"))
            let back = Reject.parse(e.reply!, peer: "seeder", peerRole: "the seeder", mode: .preSharedSecret, ourKey: nil)
            #expect("\(back)".contains("does not support wire protocol version 1"))
        }
    }

    @Test func garbageIsRejected() async throws {
        let (a, b) = InMemoryTransport.pair()
        async let s = Result { try await SecureChannel.server(over: b, credentials: .preSharedSecret(try .generate())) }
        try await a.send(Array("GET / HTTP/1.1\r\n\r\n".utf8))
        let reply = try await a.receive()
        #expect(reply?.first == WireMessageType.reject.rawValue)
        #expect(errorText(await s).contains("sent message type 71"))
    }

    @Test func oversizedHandshakeFrameIsRejected() async throws {
        let (a, b) = InMemoryTransport.pair()
        async let s = Result { try await SecureChannel.server(over: b, credentials: .preSharedSecret(try .generate())) }
        try await a.send([UInt8](repeating: 1, count: WireLimits.handshakeMaxFrame + 1))
        #expect(errorText(await s).contains("oversized frame"))
    }

    @Test func peerThatStopsMidHandshakeTimesOut() async throws {
        let (a, b) = InMemoryTransport.pair()
        var o = SecureChannelOptions(); o.handshakeTimeout = .milliseconds(100)
        async let s = Result { try await SecureChannel.server(over: b, credentials: .preSharedSecret(try .generate()), options: o) }
        // Send nothing: a stalled peer. The message names the configured
        // timeout, so it was that one, not the 10 s default, that fired (no
        // wall-clock bound: these hosts are shared).
        let r = await s
        #expect(errorText(r).contains("did not complete the handshake within 0.1 seconds"), "\(errorText(r))")
        _ = a
    }

    @Test func peerClosingMidHandshake() async throws {
        let (a, b) = InMemoryTransport.pair()
        async let c = Result { try await SecureChannel.client(over: a, credentials: .preSharedSecret(try .generate())) }
        _ = try await b.receive()  // ClientHello
        b.close()
        #expect(errorText(await c).contains("closed the connection while we waited for ServerHello"))
    }
}
