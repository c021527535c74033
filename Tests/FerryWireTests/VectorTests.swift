// Checks the implementation against Protocols/wire-vectors/*.txt: fixed keys
// and ephemerals -> every handshake frame, the transcript hash, the session
// keys, sealed records, a rekeyed key, and encoded RPC messages.
//
// Regenerate (only when the protocol changes on purpose):
//   FERRY_WRITE_VECTORS=1 swift test --filter VectorTests

import Testing
@testable import FerryWire
#if canImport(Glibc)
import Glibc
#endif

let vectorDir: String = {
    var parts = #filePath.split(separator: "/").dropLast(3)   // …/Tests/FerryWireTests/VectorTests.swift
    return "/" + parts.joined(separator: "/") + "/Protocols/wire-vectors"
}()

/// `name = hex` lines; `#` comments.
func readVectors(_ name: String) throws -> [String: String] {
    let text = try KeyFiles.read("\(vectorDir)/\(name)")
    var out: [String: String] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        let kv = line.split(separator: "=", maxSplits: 1).map { $0.trimmingWhitespace }
        if kv.count == 2 { out[String(kv[0])] = String(kv[1]) }
    }
    return out
}

func writeVectors(_ name: String, header: String, _ entries: [(String, String)]) throws {
    var text = header.split(separator: "\n").map { "# " + $0 }.joined(separator: "\n") + "\n"
    for (k, v) in entries { text += "\(k) = \(v)\n" }
    try KeyFiles.write("\(vectorDir)/\(name)", text, mode: 0o644, replace: true)
}

func bytes(_ n: Int, from start: UInt8) -> [UInt8] { (0..<n).map { start &+ UInt8($0) } }

/// Runs a deterministic handshake and computes every vector value.
func computeHandshakeVectors(keysMode: Bool, compression: (client: CompressionMode, server: CompressionMode)? = nil) throws -> [(String, String)] {
    let cEph = SecretBytes(bytes(32, from: 0x10)), sEph = SecretBytes(bytes(32, from: 0x50))
    let psk = bytes(32, from: 0xA0)
    let clientKP = try KeyPair.fromSeed(bytes(32, from: 0x20)), serverKP = try KeyPair.fromSeed(bytes(32, from: 0x60))
    let clientCreds: Credentials = keysMode
        ? .keys(clientKP, authorized: AuthorizedKeys([]), pinnedPeer: serverKP.publicKey)
        : .preSharedSecret(try PreSharedSecret(bytes: psk))
    let serverCreds: Credentials = keysMode
        ? .keys(serverKP, authorized: AuthorizedKeys([clientKP.publicKey]), pinnedPeer: nil)
        : .preSharedSecret(try PreSharedSecret(bytes: psk))
    var client = try ClientHandshake(credentials: clientCreds, peer: "s", offerAES: true, compression: compression?.client ?? .off,
                                     ephemeral: (cEph, try X25519.publicKey(cEph)))
    var server = try ServerHandshake(credentials: serverCreds, peer: "c", allowAES: false, compression: compression?.server ?? .off,
                                     ephemeral: (sEph, try X25519.publicKey(sEph)))
    let m1 = try client.hello()
    let m2 = try server.handleClientHello(m1)
    let m3 = try client.handleServerHello(m2)
    let (m4, sKeys) = try server.handleClientAuth(m3)
    let cKeys = try client.handleServerAccept(m4)
    #expect(cKeys.sendKey == sKeys.receiveKey && cKeys.receiveKey == sKeys.sendKey && cKeys.transcriptHash == sKeys.transcriptHash)
    let payload = Array("hello, seeder".utf8)
    let x = try AEADKey(suite: .xchacha20poly1305, key: cKeys.sendKey)
    var out: [(String, String)] = []
    if keysMode {
        out += [("client_seed", bytes(32, from: 0x20).hexString), ("server_seed", bytes(32, from: 0x60).hexString),
                ("client_public", clientKP.publicKey.bytes.hexString), ("server_public", serverKP.publicKey.bytes.hexString)]
    } else {
        out += [("psk", psk.hexString)]
    }
    out += [
        ("client_ephemeral_secret", bytes(32, from: 0x10).hexString),
        ("server_ephemeral_secret", bytes(32, from: 0x50).hexString),
        ("client_hello", m1.hexString), ("server_hello", m2.hexString),
        ("client_auth", m3.hexString), ("server_accept", m4.hexString),
        ("transcript_hash", cKeys.transcriptHash.hexString),
        ("cipher", "\(cKeys.suite.rawValue)"),
        ("key_c2s", cKeys.sendKey.hexString), ("key_s2c", cKeys.receiveKey.hexString),
        ("record_payload", payload.hexString),
        ("record_c2s_0_xchacha", try SecureChannel.sealRecord(type: 0x10, payload: payload, key: x, counter: 0).hexString),
        ("record_c2s_1_xchacha", try SecureChannel.sealRecord(type: 0x10, payload: payload, key: x, counter: 1).hexString),
        ("close_c2s_2_xchacha", try SecureChannel.sealRecord(type: 0x11, payload: [], key: x, counter: 2).hexString),
        ("key_c2s_epoch1", try KeySchedule.ratchet(cKeys.sendKey).hexString),
    ]
    if compression != nil {
        // Version 2 records (wire.md § 5.4): the payload raw with flag 0, and
        // 4 KiB of text as one zstd frame (level 1) with flag 1.
        #expect(cKeys.compression == sKeys.compression)
        let text = Array(String(repeating: "ferry compresses pages before sealing them. ", count: 94).utf8.prefix(4096))
        let raw = payload + [RecordEncoding.raw.rawValue]
        let zstd = try #require(Zstd.shared.compress(text, level: 1, suffix: RecordEncoding.zstd.rawValue))
        out += [
            ("compression_mode", "\(cKeys.compression.wireValue)"),
            ("record_c2s_0_raw_plaintext", raw.hexString),
            ("record_c2s_0_raw_xchacha", try SecureChannel.sealRecord(type: 0x10, payload: raw, key: x, counter: 0).hexString),
            ("record_c2s_1_text", text.hexString),
            ("record_c2s_1_zstd_plaintext", zstd.hexString),
            ("record_c2s_1_zstd_xchacha", try SecureChannel.sealRecord(type: 0x10, payload: zstd, key: x, counter: 1).hexString),
        ]
    }
    return out
}

func computeRPCVectors() -> [(String, String)] {
    let batch = RPCMessage.batch([RPCMessage.frame(.request, id: 1, code: 0x0100, payload: [0xAA]),
                                  RPCMessage.frame(.request, id: 2, code: 0x0101, payload: [])])
    return [
        ("request", RPCMessage.frame(.request, id: 0x01020304, code: 0x0100, payload: [1, 2, 3]).hexString),
        ("response", RPCMessage.frame(.response, id: 0x01020304, payload: [9]).hexString),
        ("part", RPCMessage.frame(.part, id: 7, payload: [0, 0]).hexString),
        ("error", RPCMessage.frame(.error, id: 7, code: RPCErrorCode.unknownMethod.rawValue, payload: Array("no such method".utf8)).hexString),
        ("cancel", RPCMessage.frame(.cancel, id: 7).hexString),
        ("ping", RPCMessage.frame(.ping, id: 0xCAFE).hexString),
        ("pong", RPCMessage.frame(.pong, id: 0xCAFE).hexString),
        ("batch_of_two_requests", batch.hexString),
    ]
}

@Suite struct VectorTests {
    static let writing = getenv("FERRY_WRITE_VECTORS") != nil

    @Test(arguments: [("handshake-psk.txt", false), ("handshake-keys.txt", true)])
    func handshake(file: String, keysMode: Bool) throws {
        let computed = try computeHandshakeVectors(keysMode: keysMode)
        if Self.writing {
            try writeVectors(file, header: """
            Ferry wire v1 handshake vector, \(keysMode ? "key-pair" : "pre-shared-secret") mode (Protocols/wire.md § Test vectors).
            Client offers [AES-256-GCM, XChaCha20-Poly1305]; the server does not allow AES, so cipher 2 is chosen.
            X25519 ephemeral secrets are used as given (libsodium clamps them). Hex, big-endian where numeric.
            """, computed)
        }
        let v = try readVectors(file)
        for (k, value) in computed { #expect(v[k] == value, "\(file): \(k)") }
    }

    @Test func compressionHandshakeAndRecords() throws {
        let file = "handshake-psk-compress.txt"
        let computed = try computeHandshakeVectors(keysMode: false, compression: (client: .auto, server: .zstd))
        if Self.writing {
            try writeVectors(file, header: """
            Ferry wire v2 handshake vector with compression, pre-shared-secret mode (Protocols/wire.md § 4.6, § 5.4, § 12).
            The client offers zstd in mode auto, the server's mode is zstd, so the result is zstd (mode 2).
            Other inputs as in handshake-psk.txt. The zstd frame is what libzstd 1.5.4 writes at level 1; another
            zstd version may write other (equally valid) bytes: receivers must decode it, senders need not reproduce it.
            """, computed)
        }
        let v = try readVectors(file)
        for (k, value) in computed where k != "record_c2s_1_zstd_plaintext" && k != "record_c2s_1_zstd_xchacha" {
            #expect(v[k] == value, "\(file): \(k)")
        }
        // Whatever zstd wrote, the vector's compressed record opens and decodes to the text.
        let key = try AEADKey(suite: .xchacha20poly1305, key: [UInt8](hex: v["key_c2s"]!)!)
        let rec = [UInt8](hex: v["record_c2s_1_zstd_xchacha"]!)!
        let plain = try #require(key.open(counter: 1, ad: [rec[0]], ciphertext: Array(rec[1...])))
        #expect(try SecureChannel.decode(plain, limit: WireLimits.maxFrame, peer: "vector") == [UInt8](hex: v["record_c2s_1_text"]!))
    }

    @Test func rpcMessages() throws {
        let computed = computeRPCVectors()
        if Self.writing { try writeVectors("rpc-messages.txt", header: "Ferry RPC encoding v1: each value is one frame (messages as payload || 12-byte trailer, then the version byte), hex.", computed) }
        let v = try readVectors("rpc-messages.txt")
        for (k, value) in computed {
            #expect(v[k] == value, "\(k)")
            var ids: [UInt32] = []
            try RPCMessage.decode(frame: [UInt8](hex: value)!) { ids.append($0.id) }
            #expect(ids.count == (k == "batch_of_two_requests" ? 2 : 1))
            if k == "batch_of_two_requests" { #expect(ids == [1, 2]) }
        }
    }

    @Test func recordsOpenWithTheVectorKeys() throws {
        let v = try readVectors("handshake-psk.txt")
        let key = try AEADKey(suite: .xchacha20poly1305, key: [UInt8](hex: v["key_c2s"]!)!)
        let rec = [UInt8](hex: v["record_c2s_1_xchacha"]!)!
        let plain = key.open(counter: 1, ad: [rec[0]], ciphertext: Array(rec[1...]))
        #expect(plain == [UInt8](hex: v["record_payload"]!))
        #expect(key.open(counter: 0, ad: [rec[0]], ciphertext: Array(rec[1...])) == nil)   // wrong counter = replay
    }
}
