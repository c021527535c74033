// The Ferry handshake (Protocols/wire.md § Handshake) as two pure state
// machines, `ClientHandshake` and `ServerHandshake`: bytes in, bytes out, no
// I/O, so the secure channel drives them over any transport and the fuzz
// target drives them directly.
//
//   client                                         server
//   ClientHello  type 1, "FRRY", version, mode, ciphers, e_c  ->
//             <-  ServerHello  type 2, version, cipher, e_s, AEAD(k_hs_s2c, identity+signature | empty)
//   ClientAuth   type 3, AEAD(k_hs_c2s, identity+signature | empty)  ->
//             <-  ServerAccept type 4, AEAD(k_hs_s2c, nonce 1, empty)
//   Either side may answer any message with Reject (type 15, code, text) and close.

/// How a peer proves who it is.
public enum Credentials: Sendable {
    /// Both sides hold the same 256-bit secret (`--secret-file`).
    case preSharedSecret(PreSharedSecret)
    /// A static key pair; the peer must be in `authorized`. A client with
    /// `pinnedPeer` accepts exactly that server key (and ignores `authorized`).
    case keys(KeyPair, authorized: AuthorizedKeys, pinnedPeer: PublicKey?)

    var mode: AuthMode {
        switch self {
        case .preSharedSecret: return .preSharedSecret
        case .keys: return .keys
        }
    }
}

/// Authentication modes on the wire.
enum AuthMode: UInt8, Sendable {
    case preSharedSecret = 1
    case keys = 2

    var text: String { self == .preSharedSecret ? "a pre-shared secret (--secret-file)" : "key pairs (--key/--authorized)" }
}

/// Handshake message types and record types: one registry (wire.md § Registries).
enum WireMessageType: UInt8 {
    case clientHello = 0x01
    case serverHello = 0x02
    case clientAuth = 0x03
    case serverAccept = 0x04
    case reject = 0x0F
    case data = 0x10
    case close = 0x11
}

/// Handshake constants.
enum HandshakeConstants {
    static let magic: [UInt8] = Array("FRRY".utf8)
    /// Version 1: no options. Version 2 (wire.md § 4.6) adds the compression
    /// offer to ClientHello and the choice to ServerHello. A client that offers
    /// nothing sends version 1, so it still talks to version-1 servers.
    static let version: UInt16 = 1
    static let compressionVersion: UInt16 = 2
    static let supportedVersions: [UInt16] = [1, 2]
    static let protocolName: [UInt8] = Array("ferry-wire-v1".utf8)
    static let serverSignatureLabel: [UInt8] = Array("ferry-wire-v1 server signature".utf8)
    static let clientSignatureLabel: [UInt8] = Array("ferry-wire-v1 client signature".utf8)
    /// Handshake messages are always sealed with XChaCha20-Poly1305 (available everywhere).
    static let handshakeSuite = CipherSuite.xchacha20poly1305
    static let hashBytes = 64
    static let keyBytes = 32
}

/// Why a handshake failed, as sent in a Reject message (code) and reported locally.
public enum HandshakeFailure: UInt8, Sendable, CustomStringConvertible {
    case malformed = 1
    case unsupportedVersion = 2
    case modeMismatch = 3
    case noCommonCipher = 4
    case authenticationFailed = 5
    case unknownKey = 6
    case keyMismatch = 7
    case badSignature = 8
    case timeout = 9
    case internalError = 10
    /// The server already runs `WireLimits.maxPendingHandshakes` handshakes.
    case busy = 11
    /// Local only, never sent: the peer closed the connection mid-handshake.
    case peerClosed = 0xF0

    public var description: String {
        switch self {
        case .malformed: return "malformed handshake message"
        case .unsupportedVersion: return "unsupported protocol version"
        case .modeMismatch: return "authentication mode mismatch"
        case .noCommonCipher: return "no common cipher"
        case .authenticationFailed: return "authentication failed"
        case .unknownKey: return "unknown public key"
        case .keyMismatch: return "server key mismatch"
        case .badSignature: return "bad signature"
        case .timeout: return "handshake timeout"
        case .internalError: return "internal error"
        case .busy: return "too many connections in their handshake"
        case .peerClosed: return "peer closed"
        }
    }
}

/// A failed handshake: what failed, who decided, and what to do.
public struct HandshakeError: Error, CustomStringConvertible, Sendable {
    public var failure: HandshakeFailure
    /// True when the peer sent a Reject; false when this side rejected or gave up.
    public var rejectedByPeer: Bool
    public var peer: String
    public var detail: String
    /// The Reject frame to send to the peer before closing (local rejections only).
    var reply: [UInt8]? = nil

    public var description: String { "handshake with \(peer) failed: \(detail)" }
}

/// Role names used in messages ("the seeder", "the leecher").
public struct HandshakeRoles: Sendable {
    public var client: String
    public var server: String
    public init(client: String = "the leecher", server: String = "the seeder") {
        self.client = client; self.server = server
    }
}

/// What a successful handshake yields.
struct SessionKeys: Sendable {
    var suite: CipherSuite
    var sendKey: [UInt8]
    var receiveKey: [UInt8]
    var peerPublicKey: PublicKey?
    var transcriptHash: [UInt8]
    /// The negotiated record compression (`off` unless both sides offered it).
    var compression: CompressionMode = .off
}

/// The key schedule (wire.md § Cryptographic construction).
enum KeySchedule {
    /// KDF(key, label, context) = BLAKE2b-256(key: key, label || 0x00 || context).
    static func kdf(_ key: [UInt8], _ label: String, _ context: [UInt8] = []) throws -> [UInt8] {
        try Blake2b.hash(outputBytes: HandshakeConstants.keyBytes, key: key, [Array(label.utf8), [0], context])
    }
    static func mixHash(_ h: [UInt8], _ data: [UInt8]) throws -> [UInt8] {
        try Blake2b.hash(outputBytes: HandshakeConstants.hashBytes, [h, data])
    }
    static func initialHash() throws -> [UInt8] {
        try Blake2b.hash(outputBytes: HandshakeConstants.hashBytes, [HandshakeConstants.protocolName])
    }
    /// hs = KDF(psk or 32 zero bytes, "ferry hs", ee || h2).
    static func handshakeSecret(psk: [UInt8]?, ee: [UInt8], h2: [UInt8]) throws -> [UInt8] {
        try kdf(psk ?? [UInt8](repeating: 0, count: 32), "ferry hs", ee + h2)
    }
    static func ratchet(_ key: [UInt8]) throws -> [UInt8] { try kdf(key, "ferry rekey") }
}

/// Builds Reject frames and errors.
enum Reject {
    static func frame(_ code: HandshakeFailure, _ text: String) -> [UInt8] {
        var w = WireWriter()
        w.u8(WireMessageType.reject.rawValue); w.u8(code.rawValue)
        w.bytes16(Array(text.utf8).prefix(WireLimits.maxReasonText))
        return w.bytes
    }

    /// Parses a Reject frame into the error the receiving side reports.
    static func parse(_ frame: [UInt8], peer: String, peerRole: String, mode: AuthMode, ourKey: PublicKey?,
                      ourVersion: UInt16 = HandshakeConstants.version) -> HandshakeError {
        var r = WireReader(frame, from: 1)
        let code = (try? r.u8("reject code")).flatMap(HandshakeFailure.init(rawValue:)) ?? .internalError
        let said = (try? r.bytes16("reject text", limit: WireLimits.maxReasonText)).map { sanitize($0) } ?? ""
        let ours = ourKey.map { " (our key: \($0.text))" } ?? ""
        let detail: String
        switch code {
        case .unknownKey: detail = "\(peerRole) rejected our key: not in its authorized list\(ours); add our public key to its --authorized file"
        case .keyMismatch: detail = "\(peerRole) rejected our key: it does not match the key it pinned\(ours)"
        case .authenticationFailed where mode == .preSharedSecret:
            detail = "\(peerRole) rejected the connection: the pre-shared secrets differ; check that both sides use the same --secret-file"
        case .unsupportedVersion where ourVersion >= HandshakeConstants.compressionVersion:
            detail = "\(peerRole) does not support wire protocol version \(ourVersion) (compression); upgrade it, or use --compress off to talk to it"
        case .unsupportedVersion: detail = "\(peerRole) does not support wire protocol version \(ourVersion); upgrade one side"
        case .modeMismatch: detail = "\(peerRole) rejected the connection: it expects the other authentication mode (we offered \(mode.text))"
        case .busy: detail = "\(peerRole) is busy: too many connections are in their handshake there; retry in a few seconds"
        default: detail = "\(peerRole) rejected the connection: \(code)"
        }
        let quoted = said.isEmpty ? "" : " (\(peerRole) says: \"\(said)\")"
        return HandshakeError(failure: code, rejectedByPeer: true, peer: peer, detail: detail + quoted)
    }

    /// Printable ASCII only, so a hostile peer cannot inject terminal escapes.
    static func sanitize(_ b: [UInt8], limit: Int = 200) -> String {
        String(decoding: b.prefix(limit).map { (0x20...0x7e).contains($0) ? $0 : 0x3f }, as: UTF8.self)
    }
}

/// Shared pieces of both roles.
struct HandshakeContext {
    let credentials: Credentials
    let peer: String
    let roles: HandshakeRoles
    let ephemeralSecret: SecretBytes
    let ephemeralPublic: [UInt8]

    init(credentials: Credentials, peer: String, roles: HandshakeRoles, ephemeral: (SecretBytes, [UInt8])?) throws {
        self.credentials = credentials; self.peer = peer; self.roles = roles
        if let e = ephemeral { ephemeralSecret = e.0; ephemeralPublic = e.1 }
        else { (ephemeralSecret, ephemeralPublic) = try X25519.generate() }
    }

    var psk: [UInt8]? {
        if case .preSharedSecret(let s) = credentials { return s.secret.bytes }
        return nil
    }
    var ourKey: PublicKey? {
        if case .keys(let kp, _, _) = credentials { return kp.publicKey }
        return nil
    }

    /// A local rejection: the error to throw, carrying the Reject frame to send.
    func reject(_ code: HandshakeFailure, _ detail: String, tell text: String) -> HandshakeError {
        HandshakeError(failure: code, rejectedByPeer: false, peer: peer, detail: detail, reply: Reject.frame(code, text))
    }

    /// Identity proof plaintext: public key || signature over (label || transcript hash).
    func identityProof(label: [UInt8], hash: [UInt8]) throws -> [UInt8] {
        guard case .keys(let kp, _, _) = credentials else { return [] }
        return kp.publicKey.bytes + (try kp.sign(label + hash))
    }

    func checkFrame(_ frame: [UInt8], expect: WireMessageType, peerRole: String, stage: String,
                    ourVersion: UInt16 = HandshakeConstants.version) throws {
        guard let t = frame.first else {
            throw reject(.malformed, "\(peerRole) sent an empty frame during the handshake (\(stage))", tell: "empty handshake frame")
        }
        if t == WireMessageType.reject.rawValue {
            throw Reject.parse(frame, peer: peer, peerRole: peerRole, mode: credentials.mode, ourKey: ourKey, ourVersion: ourVersion)
        }
        guard t == expect.rawValue else {
            throw reject(.malformed, "\(peerRole) sent message type \(t) where \(stage) (type \(expect.rawValue)) was expected; is it a Ferry peer of the same version?",
                         tell: "expected message type \(expect.rawValue)")
        }
    }
}

/// The client (leecher) side.
struct ClientHandshake {
    enum State { case start, sentHello, sentAuth, done }
    private(set) var state = State.start
    let ctx: HandshakeContext
    let offerAES: Bool
    /// What we offer: `off` sends a version-1 ClientHello with no offer.
    let compression: CompressionMode
    private var hash: [UInt8] = []
    private var hs: [UInt8] = []
    private var suite = CipherSuite.xchacha20poly1305
    private var peerKey: PublicKey? = nil
    private var negotiated = CompressionMode.off

    var sentVersion: UInt16 { compression == .off ? HandshakeConstants.version : HandshakeConstants.compressionVersion }

    init(credentials: Credentials, peer: String, roles: HandshakeRoles = .init(), offerAES: Bool = CipherSuite.aesAvailable,
         compression: CompressionMode = .off, ephemeral: (SecretBytes, [UInt8])? = nil) throws {
        if case .keys(_, let authorized, let pin) = credentials, pin == nil, authorized.isEmpty {
            throw HandshakeError(failure: .internalError, rejectedByPeer: false, peer: peer,
                                 detail: "no way to authenticate \(roles.server): pin its public key or list it in the --authorized file")
        }
        ctx = try HandshakeContext(credentials: credentials, peer: peer, roles: roles, ephemeral: ephemeral)
        self.offerAES = offerAES
        self.compression = compression
    }

    /// Message 1: ClientHello.
    mutating func hello() throws -> [UInt8] {
        precondition(state == .start, "hello() called twice")
        var w = WireWriter()
        w.u8(WireMessageType.clientHello.rawValue)
        w.raw(HandshakeConstants.magic)
        w.u16(sentVersion)
        w.u8(ctx.credentials.mode.rawValue)
        let ciphers: [CipherSuite] = offerAES ? [.aes256gcm, .xchacha20poly1305] : [.xchacha20poly1305]
        w.u8(UInt8(ciphers.count))
        for c in ciphers { w.u8(c.rawValue) }
        w.raw(ctx.ephemeralPublic)
        if sentVersion >= HandshakeConstants.compressionVersion {
            // Version 2: compression_mode, then the algorithms we support.
            w.u8(compression.wireValue)
            w.u8(1); w.u8(CompressionAlgorithm.zstd.rawValue)
        }
        hash = try KeySchedule.mixHash(try KeySchedule.initialHash(), w.bytes)
        state = .sentHello
        return w.bytes
    }

    /// Message 2 in, message 3 out.
    mutating func handleServerHello(_ frame: [UInt8]) throws -> [UInt8] {
        precondition(state == .sentHello, "ServerHello handled out of order")
        let server = ctx.roles.server
        try ctx.checkFrame(frame, expect: .serverHello, peerRole: server, stage: "ServerHello", ourVersion: sentVersion)
        var r = WireReader(frame, from: 1)
        let parsed: (UInt16, UInt8, [UInt8])
        var choice: (algorithm: UInt8, mode: UInt8) = (0, 0)
        do {
            parsed = (try r.u16("version"), try r.u8("cipher"), try r.raw(X25519.keyBytes, "ephemeral key"))
            if parsed.0 == HandshakeConstants.compressionVersion, sentVersion == parsed.0 {
                choice = (try r.u8("compression algorithm"), try r.u8("compression mode"))
            }
        } catch {
            throw ctx.reject(.malformed, "\(server) sent a malformed ServerHello: \(error.what)", tell: "malformed ServerHello")
        }
        let (version, cipherID, eServer) = parsed
        guard version == sentVersion else {
            throw ctx.reject(.unsupportedVersion, "\(server) answered with wire version \(version); this side sent version \(sentVersion)",
                             tell: "version \(version) not supported")
        }
        // The choice must be one our offer allows (it is in h2, so authenticated below).
        guard let chosenMode = CompressionMode(wireValue: choice.mode),
              (choice.algorithm == 0 && chosenMode == .off)
                || (choice.algorithm == CompressionAlgorithm.zstd.rawValue && chosenMode != .off
                    && CompressionMode.negotiate(compression, chosenMode) == chosenMode) else {
            throw ctx.reject(.malformed, "\(server) chose compression \(choice.algorithm) in mode \(choice.mode), which our offer (\(compression)) does not allow",
                             tell: "compression choice not offered")
        }
        negotiated = chosenMode
        guard let chosen = CipherSuite(rawValue: cipherID), chosen == .xchacha20poly1305 || (chosen == .aes256gcm && offerAES) else {
            throw ctx.reject(.noCommonCipher, "\(server) chose cipher \(cipherID), which this side did not offer", tell: "cipher not offered")
        }
        suite = chosen
        let headerEnd = r.offset
        let h2 = try KeySchedule.mixHash(hash, Array(frame[0..<headerEnd]))
        var ee: [UInt8]
        do { ee = try X25519.sharedSecret(ctx.ephemeralSecret, eServer) }
        catch { throw ctx.reject(.malformed, "\(server) sent an invalid ephemeral key: \(error)", tell: "invalid ephemeral key") }
        var psk = ctx.psk
        hs = try KeySchedule.handshakeSecret(psk: psk, ee: ee, h2: h2)
        Sodium.wipe(&ee)
        if psk != nil { Sodium.wipe(&psk!) }
        let sealed = Array(frame[headerEnd...])
        let kS = try AEADKey(suite: HandshakeConstants.handshakeSuite, key: try KeySchedule.kdf(hs, "ferry hs s2c"))
        guard let proof = kS.open(counter: 0, ad: h2, ciphertext: sealed) else {
            if ctx.credentials.mode == .preSharedSecret {
                throw ctx.reject(.authenticationFailed,
                                 "\(server)'s proof did not verify: the pre-shared secrets differ (or the handshake was altered in transit); check that both sides use the same --secret-file",
                                 tell: "the pre-shared secrets differ")
            }
            throw ctx.reject(.authenticationFailed, "\(server)'s handshake failed authentication: altered in transit, or it expects a pre-shared secret",
                             tell: "ServerHello failed authentication")
        }
        hash = try KeySchedule.mixHash(h2, sealed)   // h3
        if case .keys(_, let authorized, let pin) = ctx.credentials {
            let sigBytes = Ed25519.signatureBytes
            guard proof.count == Ed25519.publicKeyBytes + sigBytes else {
                throw ctx.reject(.malformed, "\(server)'s identity proof is \(proof.count) bytes; expected a key and a signature", tell: "malformed identity proof")
            }
            let key = try PublicKey(bytes: Array(proof[0..<Ed25519.publicKeyBytes]))
            if let pin, pin != key {
                throw ctx.reject(.keyMismatch,
                                 "\(server)'s key \(key.text) does not match the pinned key \(pin.text); someone may be intercepting the connection, or \(server)'s key changed",
                                 tell: "your key does not match the pinned key")
            }
            if pin == nil, !authorized.contains(key) {
                throw ctx.reject(.unknownKey, "\(server)'s key \(key.text) is not in our authorized list; add it to the --authorized file to accept it",
                                 tell: "your key is not in the authorized list")
            }
            guard Ed25519.verify(Array(proof[Ed25519.publicKeyBytes...]), HandshakeConstants.serverSignatureLabel + h2, publicKey: key.bytes) else {
                throw ctx.reject(.badSignature, "\(server)'s signature over the handshake did not verify (altered in transit?)", tell: "bad signature")
            }
            peerKey = key
        } else if !proof.isEmpty {
            throw ctx.reject(.malformed, "\(server) sent an identity in pre-shared-secret mode", tell: "unexpected identity proof")
        }
        // Message 3: ClientAuth.
        let kC = try AEADKey(suite: HandshakeConstants.handshakeSuite, key: try KeySchedule.kdf(hs, "ferry hs c2s"))
        let ourProof = try ctx.identityProof(label: HandshakeConstants.clientSignatureLabel, hash: hash)
        let out = [WireMessageType.clientAuth.rawValue] + (try kC.seal(counter: 0, ad: hash, plaintext: ourProof))
        hash = try KeySchedule.mixHash(hash, out)    // h4
        state = .sentAuth
        return out
    }

    /// Message 4 in: the session keys.
    mutating func handleServerAccept(_ frame: [UInt8]) throws -> SessionKeys {
        precondition(state == .sentAuth, "ServerAccept handled out of order")
        let server = ctx.roles.server
        try ctx.checkFrame(frame, expect: .serverAccept, peerRole: server, stage: "ServerAccept")
        let kS = try AEADKey(suite: HandshakeConstants.handshakeSuite, key: try KeySchedule.kdf(hs, "ferry hs s2c"))
        guard let empty = kS.open(counter: 1, ad: hash, ciphertext: Array(frame[1...])), empty.isEmpty else {
            throw ctx.reject(.authenticationFailed, "\(server)'s ServerAccept failed authentication (altered in transit?)", tell: "ServerAccept failed authentication")
        }
        state = .done
        var ms = try KeySchedule.kdf(hs, "ferry master", hash)
        defer { Sodium.wipe(&ms); Sodium.wipe(&hs) }
        return SessionKeys(suite: suite, sendKey: try KeySchedule.kdf(ms, "ferry data c2s"), receiveKey: try KeySchedule.kdf(ms, "ferry data s2c"),
                           peerPublicKey: peerKey, transcriptHash: hash, compression: negotiated)
    }
}

/// The server (seeder) side.
struct ServerHandshake {
    enum State { case start, sentHello, done }
    private(set) var state = State.start
    let ctx: HandshakeContext
    let allowAES: Bool
    /// What this side accepts; the result is `CompressionMode.negotiate` of both offers.
    let compression: CompressionMode
    private var hash: [UInt8] = []
    private var hs: [UInt8] = []
    private var suite = CipherSuite.xchacha20poly1305
    private var negotiated = CompressionMode.off

    init(credentials: Credentials, peer: String, roles: HandshakeRoles = .init(), allowAES: Bool = CipherSuite.aesAvailable,
         compression: CompressionMode = .off, ephemeral: (SecretBytes, [UInt8])? = nil) throws {
        if case .keys(_, let authorized, _) = credentials, authorized.isEmpty {
            throw HandshakeError(failure: .internalError, rejectedByPeer: false, peer: peer,
                                 detail: "the authorized list is empty, so every \(roles.client.replacingPrefix("the ", with: "")) would be rejected; add their public keys to the --authorized file")
        }
        ctx = try HandshakeContext(credentials: credentials, peer: peer, roles: roles, ephemeral: ephemeral)
        self.allowAES = allowAES
        self.compression = compression
    }

    /// Message 1 in, message 2 out.
    mutating func handleClientHello(_ frame: [UInt8]) throws -> [UInt8] {
        precondition(state == .start, "ClientHello handled twice")
        let client = ctx.roles.client
        try ctx.checkFrame(frame, expect: .clientHello, peerRole: client, stage: "ClientHello")
        var r = WireReader(frame, from: 1)
        let magic: [UInt8], version: UInt16
        do { magic = try r.raw(4, "magic"); version = try r.u16("version") }
        catch { throw ctx.reject(.malformed, "\(client) sent a malformed ClientHello: \(error.what)", tell: "malformed ClientHello") }
        guard magic == HandshakeConstants.magic else {
            throw ctx.reject(.malformed, "\(client) is not speaking the Ferry wire protocol (bad magic \(magic.hexString))", tell: "not a Ferry ClientHello")
        }
        guard HandshakeConstants.supportedVersions.contains(version) else {
            let list = HandshakeConstants.supportedVersions.map(String.init).joined(separator: ", ")
            throw ctx.reject(.unsupportedVersion, "\(client) speaks wire version \(version); this side speaks versions \(list)",
                             tell: "supported versions: \(list)")
        }
        let modeByte: UInt8, ciphers: [UInt8], eClient: [UInt8]
        var offer: (mode: UInt8, algorithms: [UInt8]) = (0, [])
        do {
            modeByte = try r.u8("mode")
            let n = Int(try r.u8("cipher count"))
            ciphers = try r.raw(n, "cipher list")
            eClient = try r.raw(X25519.keyBytes, "ephemeral key")
            if version >= HandshakeConstants.compressionVersion {
                offer.mode = try r.u8("compression mode")
                offer.algorithms = try r.raw(Int(try r.u8("compression algorithm count")), "compression algorithms")
            }
            try r.expectEnd("ClientHello")
        } catch { throw ctx.reject(.malformed, "\(client) sent a malformed ClientHello: \(error.what)", tell: "malformed ClientHello") }
        guard let mode = AuthMode(rawValue: modeByte) else {
            throw ctx.reject(.modeMismatch, "\(client) asked for unknown authentication mode \(modeByte)", tell: "unknown authentication mode")
        }
        guard mode == ctx.credentials.mode else {
            throw ctx.reject(.modeMismatch, "\(client) authenticates with \(mode.text), but this side expects \(ctx.credentials.mode.text)",
                             tell: "this side expects \(ctx.credentials.mode.text)")
        }
        if allowAES, ciphers.contains(CipherSuite.aes256gcm.rawValue) { suite = .aes256gcm }
        else if ciphers.contains(CipherSuite.xchacha20poly1305.rawValue) { suite = .xchacha20poly1305 }
        else { throw ctx.reject(.noCommonCipher, "\(client) offered no cipher this side supports (offered \(ciphers))", tell: "no common cipher") }

        guard let clientCompression = CompressionMode(wireValue: offer.mode) else {
            throw ctx.reject(.malformed, "\(client) asked for unknown compression mode \(offer.mode)", tell: "unknown compression mode")
        }
        // Unknown algorithm ids are ignored (a later client may offer more).
        if offer.algorithms.contains(CompressionAlgorithm.zstd.rawValue) {
            negotiated = CompressionMode.negotiate(clientCompression, compression)
        }

        let h1 = try KeySchedule.mixHash(try KeySchedule.initialHash(), frame)
        var w = WireWriter()
        w.u8(WireMessageType.serverHello.rawValue); w.u16(version); w.u8(suite.rawValue); w.raw(ctx.ephemeralPublic)
        if version >= HandshakeConstants.compressionVersion {
            w.u8(negotiated == .off ? 0 : CompressionAlgorithm.zstd.rawValue)
            w.u8(negotiated.wireValue)
        }
        let h2 = try KeySchedule.mixHash(h1, w.bytes)
        var ee: [UInt8]
        do { ee = try X25519.sharedSecret(ctx.ephemeralSecret, eClient) }
        catch { throw ctx.reject(.malformed, "\(client) sent an invalid ephemeral key: \(error)", tell: "invalid ephemeral key") }
        var psk = ctx.psk
        hs = try KeySchedule.handshakeSecret(psk: psk, ee: ee, h2: h2)
        Sodium.wipe(&ee)
        if psk != nil { Sodium.wipe(&psk!) }
        let kS = try AEADKey(suite: HandshakeConstants.handshakeSuite, key: try KeySchedule.kdf(hs, "ferry hs s2c"))
        let proof = try ctx.identityProof(label: HandshakeConstants.serverSignatureLabel, hash: h2)
        let sealed = try kS.seal(counter: 0, ad: h2, plaintext: proof)
        hash = try KeySchedule.mixHash(h2, sealed)   // h3
        state = .sentHello
        return w.bytes + sealed
    }

    /// Message 3 in, message 4 out, with the session keys.
    mutating func handleClientAuth(_ frame: [UInt8]) throws -> (reply: [UInt8], keys: SessionKeys) {
        precondition(state == .sentHello, "ClientAuth handled out of order")
        let client = ctx.roles.client
        try ctx.checkFrame(frame, expect: .clientAuth, peerRole: client, stage: "ClientAuth")
        let kC = try AEADKey(suite: HandshakeConstants.handshakeSuite, key: try KeySchedule.kdf(hs, "ferry hs c2s"))
        guard let proof = kC.open(counter: 0, ad: hash, ciphertext: Array(frame[1...])) else {
            if ctx.credentials.mode == .preSharedSecret {
                throw ctx.reject(.authenticationFailed, "\(client)'s proof did not verify: the pre-shared secrets differ (or the handshake was altered in transit)",
                                 tell: "the pre-shared secrets differ")
            }
            throw ctx.reject(.authenticationFailed, "\(client)'s ClientAuth failed authentication (altered in transit?)", tell: "ClientAuth failed authentication")
        }
        var peerKey: PublicKey? = nil
        if case .keys(_, let authorized, _) = ctx.credentials {
            guard proof.count == Ed25519.publicKeyBytes + Ed25519.signatureBytes else {
                throw ctx.reject(.malformed, "\(client)'s identity proof is \(proof.count) bytes; expected a key and a signature", tell: "malformed identity proof")
            }
            let key = try PublicKey(bytes: Array(proof[0..<Ed25519.publicKeyBytes]))
            guard authorized.contains(key) else {
                throw ctx.reject(.unknownKey, "\(client)'s key \(key.text) is not in our authorized list; add it to the --authorized file to accept it",
                                 tell: "your key is not in the authorized list")
            }
            guard Ed25519.verify(Array(proof[Ed25519.publicKeyBytes...]), HandshakeConstants.clientSignatureLabel + hash, publicKey: key.bytes) else {
                throw ctx.reject(.badSignature, "\(client)'s signature over the handshake did not verify (altered in transit?)", tell: "bad signature")
            }
            peerKey = key
        } else if !proof.isEmpty {
            throw ctx.reject(.malformed, "\(client) sent an identity in pre-shared-secret mode", tell: "unexpected identity proof")
        }
        hash = try KeySchedule.mixHash(hash, frame)   // h4
        let kS = try AEADKey(suite: HandshakeConstants.handshakeSuite, key: try KeySchedule.kdf(hs, "ferry hs s2c"))
        let reply = [WireMessageType.serverAccept.rawValue] + (try kS.seal(counter: 1, ad: hash, plaintext: []))
        state = .done
        var ms = try KeySchedule.kdf(hs, "ferry master", hash)
        defer { Sodium.wipe(&ms); Sodium.wipe(&hs) }
        return (reply, SessionKeys(suite: suite, sendKey: try KeySchedule.kdf(ms, "ferry data s2c"), receiveKey: try KeySchedule.kdf(ms, "ferry data c2s"),
                                   peerPublicKey: peerKey, transcriptHash: hash, compression: negotiated))
    }
}

extension String {
    func replacingPrefix(_ prefix: String, with other: String) -> String {
        hasPrefix(prefix) ? other + dropFirst(prefix.count) : self
    }
}
