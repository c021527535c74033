// One entry point that feeds arbitrary bytes to every parser an
// unauthenticated or hostile peer can reach: RPC frames, each handshake
// message in both modes, Reject, the record opener, and the credential-file
// parsers. Used by FuzzReplayTests (seeded, in-process) and by the libFuzzer
// target in Tools/fuzz/ (Tools/fuzz.sh). It must never crash or trap.
// It lives with the tests, not in FerryWire: building its fixture uses
// `try!`, which the product library has none of. Tools/fuzz.sh compiles it
// into one module with the FerryWire sources, hence the conditional import.
#if canImport(FerryWire)
@testable import FerryWire
#endif

enum WireFuzz {
    /// Targets, selected by the first input byte (modulo the count).
    enum Target: UInt8, CaseIterable {
        case rpcFrame, clientHello, serverHelloPSK, clientAuthPSK, serverHelloKeys, clientAuthKeys, serverAccept, reject, record, credentialText
    }

    struct Fixture: @unchecked Sendable {
        // Invariant: built once, immutable afterwards; every run copies the value-type handshakes.
        let psk: Credentials
        let serverKeys: Credentials
        let clientKeys: Credentials
        let cEph: (SecretBytes, [UInt8])
        let sEph: (SecretBytes, [UInt8])
        let clientPSK: ClientHandshake        // after hello()
        let clientKeysHS: ClientHandshake     // after hello()
        let serverPSK: ServerHandshake        // after handling the PSK hello
        let serverKeysHS: ServerHandshake     // after handling the keys hello
        let clientAfterAuth: ClientHandshake  // PSK, waiting for ServerAccept
        let recordKey: AEADKey
        /// A valid input for each target (seeds for mutation).
        let seeds: [Target: [UInt8]]
    }

    static let fixture: Fixture = {
        func b(_ n: Int, _ s: UInt8) -> [UInt8] { (0..<n).map { s &+ UInt8($0) } }
        let cE = SecretBytes(b(32, 0x10)), sE = SecretBytes(b(32, 0x50))
        let cEph = (cE, try! X25519.publicKey(cE)), sEph = (sE, try! X25519.publicKey(sE))
        let psk = Credentials.preSharedSecret(try! PreSharedSecret(bytes: b(32, 0xA0)))
        let ck = try! KeyPair.fromSeed(b(32, 0x20)), sk = try! KeyPair.fromSeed(b(32, 0x60))
        let serverKeys = Credentials.keys(sk, authorized: AuthorizedKeys([ck.publicKey]), pinnedPeer: nil)
        let clientKeys = Credentials.keys(ck, authorized: AuthorizedKeys([]), pinnedPeer: sk.publicKey)

        var c1 = try! ClientHandshake(credentials: psk, peer: "fuzz", offerAES: false, ephemeral: cEph)
        let h1 = try! c1.hello()
        var s1 = try! ServerHandshake(credentials: psk, peer: "fuzz", allowAES: false, ephemeral: sEph)
        let sh1 = try! s1.handleClientHello(h1)
        var c1b = c1
        let ca1 = try! c1b.handleServerHello(sh1)
        var s1b = s1
        let (acc, keys) = try! s1b.handleClientAuth(ca1)

        var c2 = try! ClientHandshake(credentials: clientKeys, peer: "fuzz", offerAES: false, ephemeral: cEph)
        let h2 = try! c2.hello()
        var s2 = try! ServerHandshake(credentials: serverKeys, peer: "fuzz", allowAES: false, ephemeral: sEph)
        let sh2 = try! s2.handleClientHello(h2)
        var c2b = c2
        let ca2 = try! c2b.handleServerHello(sh2)

        let rk = try! AEADKey(suite: .xchacha20poly1305, key: keys.receiveKey)
        let rec = try! SecureChannel.sealRecord(type: 0x10, payload: Array("record".utf8), key: try! AEADKey(suite: .xchacha20poly1305, key: keys.receiveKey), counter: 0)
        let rpc = RPCMessage.batch([RPCMessage.frame(.request, id: 1, code: 0x100, payload: [1, 2, 3]),
                                    RPCMessage.frame(.error, id: 2, code: 1, payload: Array("x".utf8))])
        let seeds: [Target: [UInt8]] = [
            .rpcFrame: rpc, .clientHello: h1, .serverHelloPSK: sh1, .clientAuthPSK: ca1,
            .serverHelloKeys: sh2, .clientAuthKeys: ca2, .serverAccept: acc,
            .reject: Reject.frame(.unknownKey, "your key is not in the authorized list"),
            .record: rec, .credentialText: Array("# keys\n\(ck.publicKey.text) laptop\n\(sk.publicKey.text)\n".utf8),
        ]
        return Fixture(psk: psk, serverKeys: serverKeys, clientKeys: clientKeys, cEph: cEph, sEph: sEph,
                       clientPSK: c1, clientKeysHS: c2, serverPSK: s1, serverKeysHS: s2, clientAfterAuth: c1b,
                       recordKey: rk, seeds: seeds)
    }()

    /// Runs one input: byte 0 selects the target, the rest is the message.
    /// Returns true when the parser accepted it (for statistics only).
    @discardableResult
    static func run(_ data: [UInt8]) -> Bool {
        guard let sel = data.first else { return false }
        let target = Target.allCases[Int(sel) % Target.allCases.count]
        return run(target, Array(data.dropFirst()))
    }

    @discardableResult
    static func run(_ target: Target, _ body: [UInt8]) -> Bool {
        let f = fixture
        do {
            switch target {
            case .rpcFrame:
                try RPCMessage.decode(frame: body) { _ in }
            case .clientHello:
                var s = try ServerHandshake(credentials: f.psk, peer: "fuzz", allowAES: false, ephemeral: f.sEph)
                _ = try s.handleClientHello(body)
            case .serverHelloPSK:
                var c = f.clientPSK; _ = try c.handleServerHello(body)
            case .clientAuthPSK:
                var s = f.serverPSK; _ = try s.handleClientAuth(body)
            case .serverHelloKeys:
                var c = f.clientKeysHS; _ = try c.handleServerHello(body)
            case .clientAuthKeys:
                var s = f.serverKeysHS; _ = try s.handleClientAuth(body)
            case .serverAccept:
                var c = f.clientAfterAuth; _ = try c.handleServerAccept(body)
            case .reject:
                _ = Reject.parse(body, peer: "fuzz", peerRole: "the seeder", mode: .keys, ourKey: nil)
            case .record:
                guard body.count >= 1 + f.recordKey.suite.overhead else { return false }
                return f.recordKey.open(counter: 0, ad: [body[0]], ciphertext: Array(body[1...])) != nil
            case .credentialText:
                let text = String(decoding: body, as: UTF8.self)
                _ = try? AuthorizedKeys(text: text)
                _ = try? PreSharedSecret(text: text)
                _ = try PublicKey(text: text)
            }
            return true
        } catch {
            return false
        }
    }
}
