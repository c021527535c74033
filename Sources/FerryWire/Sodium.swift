// The only file in Ferry that calls libsodium (no other module imports
// CSodium). Everything above it speaks Swift types: `SecretBytes` (zeroed on
// drop), `CipherSuite`, `AEADKey`, and small namespaces for X25519, Ed25519
// and BLAKE2b, whose streaming `Blake2b256` is public for FerryMigration's
// region checksums. Sizes come from the library, never from constants here;
// every failure throws.

internal import CSodium

/// A libsodium call failed or the library could not start.
public struct CryptoError: Error, CustomStringConvertible, Sendable, Equatable {
    public var description: String
    init(_ d: String) { description = d }
}

enum Sodium {
    /// `sodium_init()` exactly once per process; its result is remembered.
    private static let initResult: Int32 = sodium_init()

    static func ensureInitialized() throws(CryptoError) {
        guard initResult >= 0 else {
            throw CryptoError("libsodium failed to initialize (sodium_init returned \(initResult)); check that /dev/urandom is readable")
        }
    }

    static func randomBytes(_ n: Int) throws(CryptoError) -> [UInt8] {
        try ensureInitialized()
        // SAFETY: the buffer has exactly n bytes and randombytes_buf writes n bytes.
        return [UInt8](unsafeUninitializedCapacity: n) { buf, count in
            randombytes_buf(buf.baseAddress!, n); count = n
        }
    }

    /// Constant-time comparison of two byte strings of equal length.
    static func equal(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        if a.isEmpty { return true }
        // SAFETY: both buffers hold a.count bytes.
        return a.withUnsafeBytes { pa in b.withUnsafeBytes { pb in sodium_memcmp(pa.baseAddress!, pb.baseAddress!, a.count) == 0 } }
    }

    /// Overwrites an array's bytes with zeros in a way the compiler cannot elide.
    static func wipe(_ a: inout [UInt8]) {
        // SAFETY: the buffer spans the array's own storage.
        a.withUnsafeMutableBytes { if let p = $0.baseAddress { sodium_memzero(p, $0.count) } }
    }

    static func base64(_ bytes: [UInt8]) -> String {
        let variant = Int32(sodium_base64_VARIANT_ORIGINAL)
        let len = sodium_base64_encoded_len(bytes.count, variant)
        var out = [CChar](repeating: 0, count: len)
        // SAFETY: `out` holds the encoded length including the terminating NUL.
        bytes.withUnsafeBufferPointer { b in _ = sodium_bin2base64(&out, len, b.baseAddress, b.count, variant) }
        return String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func unbase64(_ text: String, maxBytes: Int) -> [UInt8]? {
        let chars = Array(text.utf8)
        var out = [UInt8](repeating: 0, count: maxBytes)
        var outLen = 0
        // SAFETY: sodium_base642bin writes at most maxBytes bytes into `out`.
        let rc = chars.withUnsafeBufferPointer { c in
            c.withMemoryRebound(to: CChar.self) { cc in
                sodium_base642bin(&out, maxBytes, cc.baseAddress, cc.count, nil, &outLen, nil, Int32(sodium_base64_VARIANT_ORIGINAL))
            }
        }
        guard rc == 0 else { return nil }
        return Array(out.prefix(outLen))
    }
}

/// Secret key material owned in one heap block, zeroed with `sodium_memzero` on drop.
final class SecretBytes: @unchecked Sendable {
    // Invariant: `pointer` is written only in init and read-only afterwards, so
    // concurrent reads from several threads are safe; freed once, in deinit.
    let pointer: UnsafeMutableRawBufferPointer

    init(count: Int) {
        pointer = .allocate(byteCount: max(count, 1), alignment: 16)
        byteCount = count
        // SAFETY: freshly allocated block of at least `count` bytes.
        sodium_memzero(pointer.baseAddress!, pointer.count)
    }

    convenience init(_ bytes: [UInt8]) {
        self.init(count: bytes.count)
        // SAFETY: the block holds at least bytes.count bytes.
        bytes.withUnsafeBytes { src in if let s = src.baseAddress { pointer.baseAddress!.copyMemory(from: s, byteCount: src.count) } }
    }

    let byteCount: Int

    /// A copy as an array (for hashing into the key schedule); wipe it after use.
    var bytes: [UInt8] { Array(UnsafeRawBufferPointer(rebasing: pointer[0..<byteCount])) }

    deinit {
        // SAFETY: the block is ours; zero it before handing it back.
        sodium_memzero(pointer.baseAddress!, pointer.count)
        pointer.deallocate()
    }
}

/// The AEAD that protects records after the handshake. Numbers are the wire's
/// cipher ids (`Protocols/wire.md` § Registries).
public enum CipherSuite: UInt8, Sendable, CustomStringConvertible, CaseIterable {
    case aes256gcm = 1
    case xchacha20poly1305 = 2

    public var description: String {
        switch self {
        case .aes256gcm: return "AES-256-GCM"
        case .xchacha20poly1305: return "XChaCha20-Poly1305"
        }
    }

    /// True when this host can run the suite (AES-256-GCM needs AES-NI and PCLMUL).
    public static var aesAvailable: Bool {
        (try? Sodium.ensureInitialized()) != nil && crypto_aead_aes256gcm_is_available() == 1
    }

    var keyBytes: Int {
        switch self {
        case .aes256gcm: return crypto_aead_aes256gcm_keybytes()
        case .xchacha20poly1305: return crypto_aead_xchacha20poly1305_ietf_keybytes()
        }
    }
    var nonceBytes: Int {
        switch self {
        case .aes256gcm: return crypto_aead_aes256gcm_npubbytes()
        case .xchacha20poly1305: return crypto_aead_xchacha20poly1305_ietf_npubbytes()
        }
    }
    /// Bytes the AEAD adds to every record (the tag).
    public var overhead: Int {
        switch self {
        case .aes256gcm: return crypto_aead_aes256gcm_abytes()
        case .xchacha20poly1305: return crypto_aead_xchacha20poly1305_ietf_abytes()
        }
    }
}

/// One direction's AEAD key (with AES-GCM's expanded key schedule precomputed).
/// Nonces are the 64-bit record counter, big-endian, in the nonce's last 8 bytes,
/// zeros before it.
final class AEADKey: @unchecked Sendable {
    // Invariant: `key` and `aesState` are written only in init; libsodium's
    // seal/open functions take them as const, so concurrent use is safe.
    let suite: CipherSuite
    private let key: SecretBytes
    private let aesState: UnsafeMutableRawPointer?
    private let aesStateBytes: Int

    init(suite: CipherSuite, key keyBytes: [UInt8]) throws(CryptoError) {
        try Sodium.ensureInitialized()
        guard keyBytes.count == suite.keyBytes else {
            throw CryptoError("\(suite) key must be \(suite.keyBytes) bytes, got \(keyBytes.count)")
        }
        self.suite = suite
        self.key = SecretBytes(keyBytes)
        if suite == .aes256gcm {
            guard crypto_aead_aes256gcm_is_available() == 1 else {
                throw CryptoError("AES-256-GCM is not available on this CPU (needs AES-NI and PCLMUL); negotiate XChaCha20-Poly1305")
            }
            aesStateBytes = crypto_aead_aes256gcm_statebytes()
            let st = UnsafeMutableRawPointer.allocate(byteCount: aesStateBytes, alignment: 16)
            // SAFETY: `st` is a 16-byte-aligned block of statebytes() bytes, as beforenm requires.
            crypto_aead_aes256gcm_beforenm(st.assumingMemoryBound(to: crypto_aead_aes256gcm_state.self),
                                          key.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self))
            aesState = st
        } else {
            aesState = nil; aesStateBytes = 0
        }
    }

    deinit {
        if let st = aesState {
            // SAFETY: our own block; the expanded key is secret too.
            sodium_memzero(st, aesStateBytes)
            st.deallocate()
        }
    }

    private func withNonce<R>(_ counter: UInt64, _ body: (UnsafePointer<UInt8>) -> R) -> R {
        let n = suite.nonceBytes
        return withUnsafeTemporaryAllocation(of: UInt8.self, capacity: n) { nb in
            for i in 0..<n { nb[i] = 0 }
            for i in 0..<8 { nb[n - 1 - i] = UInt8(truncatingIfNeeded: counter >> UInt64(8 * i)) }
            return body(UnsafePointer(nb.baseAddress!))
        }
    }

    /// Seals `plaintext` into `out`, which must hold plaintext.count + overhead bytes.
    func seal(counter: UInt64, ad: UnsafeRawBufferPointer, plaintext: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        precondition(out.count >= plaintext.count + suite.overhead, "seal output buffer too small")
        var outLen: UInt64 = 0
        let mp = plaintext.baseAddress?.assumingMemoryBound(to: UInt8.self)
        let ap = ad.baseAddress?.assumingMemoryBound(to: UInt8.self)
        let op = out.baseAddress!.assumingMemoryBound(to: UInt8.self)
        // SAFETY: pointers and lengths come from the buffers above; `out` was checked for size.
        let rc: Int32 = withNonce(counter) { np in
            switch suite {
            case .aes256gcm:
                return crypto_aead_aes256gcm_encrypt_afternm(op, &outLen, mp, UInt64(plaintext.count), ap, UInt64(ad.count), nil, np,
                                                             aesState!.assumingMemoryBound(to: crypto_aead_aes256gcm_state.self))
            case .xchacha20poly1305:
                return crypto_aead_xchacha20poly1305_ietf_encrypt(op, &outLen, mp, UInt64(plaintext.count), ap, UInt64(ad.count), nil, np,
                                                                  key.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self))
            }
        }
        guard rc == 0 else { throw CryptoError("\(suite) encryption failed (libsodium returned \(rc))") }
    }

    /// Opens `ciphertext` (tag included) into `out` (ciphertext.count - overhead bytes).
    /// Returns false when the tag does not verify.
    func open(counter: UInt64, ad: UnsafeRawBufferPointer, ciphertext: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Bool {
        guard ciphertext.count >= suite.overhead, out.count >= ciphertext.count - suite.overhead else { return false }
        var outLen: UInt64 = 0
        let cp = ciphertext.baseAddress!.assumingMemoryBound(to: UInt8.self)
        let ap = ad.baseAddress?.assumingMemoryBound(to: UInt8.self)
        // A zero-length plaintext may come with an empty output buffer: give libsodium a valid pointer anyway.
        var dummy: UInt8 = 0
        // SAFETY: sizes checked above; libsodium writes ciphertext.count - overhead bytes.
        let rc: Int32 = withUnsafeMutablePointer(to: &dummy) { dp in
            let op = out.baseAddress?.assumingMemoryBound(to: UInt8.self) ?? dp
            return withNonce(counter) { np in
                switch suite {
                case .aes256gcm:
                    return crypto_aead_aes256gcm_decrypt_afternm(op, &outLen, nil, cp, UInt64(ciphertext.count), ap, UInt64(ad.count), np,
                                                                 aesState!.assumingMemoryBound(to: crypto_aead_aes256gcm_state.self))
                case .xchacha20poly1305:
                    return crypto_aead_xchacha20poly1305_ietf_decrypt(op, &outLen, nil, cp, UInt64(ciphertext.count), ap, UInt64(ad.count), np,
                                                                      key.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self))
                }
            }
        }
        return rc == 0
    }

    /// Convenience for small messages (handshake): returns ciphertext || tag.
    func seal(counter: UInt64, ad: [UInt8], plaintext: [UInt8]) throws(CryptoError) -> [UInt8] {
        let n = plaintext.count + suite.overhead
        var out = [UInt8](repeating: 0, count: n)
        var failure: CryptoError? = nil
        ad.withUnsafeBytes { a in plaintext.withUnsafeBytes { p in out.withUnsafeMutableBytes { o in
            do throws(CryptoError) { try seal(counter: counter, ad: a, plaintext: p, into: o) } catch { failure = error }
        } } }
        if let f = failure { throw f }
        return out
    }

    /// Convenience for small messages: nil when the tag does not verify.
    func open(counter: UInt64, ad: [UInt8], ciphertext: [UInt8]) -> [UInt8]? {
        guard ciphertext.count >= suite.overhead else { return nil }
        var out = [UInt8](repeating: 0, count: ciphertext.count - suite.overhead)
        let ok = ad.withUnsafeBytes { a in ciphertext.withUnsafeBytes { c in out.withUnsafeMutableBytes { o in
            open(counter: counter, ad: a, ciphertext: c, into: o)
        } } }
        return ok ? out : nil
    }
}

/// BLAKE2b (libsodium's generichash), the protocol's hash and KDF primitive.
enum Blake2b {
    /// BLAKE2b with an optional key (16...64 bytes) over the concatenation of `parts`.
    static func hash(outputBytes: Int, key: [UInt8]? = nil, _ parts: [[UInt8]]) throws(CryptoError) -> [UInt8] {
        try Sodium.ensureInitialized()
        let stateBytes = crypto_generichash_statebytes()
        let st = UnsafeMutableRawPointer.allocate(byteCount: stateBytes, alignment: 64)
        defer { sodium_memzero(st, stateBytes); st.deallocate() }
        let sp = OpaquePointer(st)
        let keyLen = key?.count ?? 0
        // SAFETY: `st` is a 64-byte-aligned block of statebytes() bytes; every buffer is passed with its own length.
        let rcInit = (key ?? []).withUnsafeBufferPointer { k in
            crypto_generichash_init(sp, keyLen == 0 ? nil : k.baseAddress, keyLen, outputBytes)
        }
        guard rcInit == 0 else { throw CryptoError("BLAKE2b init failed (output \(outputBytes) bytes, key \(keyLen) bytes)") }
        for p in parts {
            _ = p.withUnsafeBufferPointer { b in crypto_generichash_update(sp, b.baseAddress, UInt64(b.count)) }
        }
        var out = [UInt8](repeating: 0, count: outputBytes)
        let rc = out.withUnsafeMutableBufferPointer { o in crypto_generichash_final(sp, o.baseAddress!, outputBytes) }
        guard rc == 0 else { throw CryptoError("BLAKE2b final failed") }
        return out
    }
}

/// Streaming BLAKE2b-256: the checksum of image regions, of live migrated
/// memory and of the seeder's frozen memory, so they can be compared.
public struct Blake2b256: ~Copyable {
    private let state: UnsafeMutableRawPointer

    public init() {
        // sodium_init cannot fail where the wire works at all: the channel
        // that brought these pages already needed it.
        _ = try? Sodium.ensureInitialized()
        // SAFETY: libsodium's hash state wants 64-byte alignment, which a Swift
        // stored struct does not promise; this allocation lives as long as self.
        state = UnsafeMutableRawPointer.allocate(byteCount: crypto_generichash_statebytes(), alignment: 64)
        crypto_generichash_init(OpaquePointer(state), nil, 0, 32)
    }

    deinit { state.deallocate() }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        // SAFETY: `bytes` holds `bytes.count` readable bytes.
        crypto_generichash_update(OpaquePointer(state), base.assumingMemoryBound(to: UInt8.self), UInt64(bytes.count))
    }

    public consuming func finish() -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        crypto_generichash_final(OpaquePointer(state), &digest, 32)
        return digest
    }
}

/// X25519 ephemeral Diffie-Hellman.
enum X25519 {
    static var keyBytes: Int { crypto_scalarmult_bytes() }

    /// A fresh ephemeral key pair (secret, public).
    static func generate() throws(CryptoError) -> (secret: SecretBytes, publicKey: [UInt8]) {
        try Sodium.ensureInitialized()
        let secret = SecretBytes(try Sodium.randomBytes(crypto_scalarmult_scalarbytes()))
        return (secret, try publicKey(secret))
    }

    static func publicKey(_ secret: SecretBytes) throws(CryptoError) -> [UInt8] {
        var pub = [UInt8](repeating: 0, count: crypto_scalarmult_bytes())
        // SAFETY: `pub` has scalarmult_bytes(); the secret block has scalarbytes().
        let rc = pub.withUnsafeMutableBufferPointer { p in
            crypto_scalarmult_base(p.baseAddress!, secret.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self))
        }
        guard rc == 0 else { throw CryptoError("X25519 public key derivation failed") }
        return pub
    }

    /// The shared secret; throws for a low-order peer key (all-zero result).
    static func sharedSecret(_ secret: SecretBytes, _ peer: [UInt8]) throws(CryptoError) -> [UInt8] {
        guard peer.count == crypto_scalarmult_bytes() else { throw CryptoError("X25519 peer key must be \(crypto_scalarmult_bytes()) bytes") }
        var out = [UInt8](repeating: 0, count: crypto_scalarmult_bytes())
        // SAFETY: buffers sized from the library's constants above.
        let rc = out.withUnsafeMutableBufferPointer { o in peer.withUnsafeBufferPointer { p in
            crypto_scalarmult(o.baseAddress!, secret.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self), p.baseAddress!)
        } }
        guard rc == 0 else { throw CryptoError("the peer's ephemeral key is a low-order point (X25519 produced all zeros)") }
        return out
    }
}

/// Ed25519 signatures for static identities.
enum Ed25519 {
    static var publicKeyBytes: Int { crypto_sign_publickeybytes() }
    static var seedBytes: Int { crypto_sign_seedbytes() }
    static var signatureBytes: Int { crypto_sign_bytes() }

    /// Expands a seed into (secret key, public key).
    static func keyPair(seed: [UInt8]) throws(CryptoError) -> (secret: SecretBytes, publicKey: [UInt8]) {
        try Sodium.ensureInitialized()
        guard seed.count == seedBytes else { throw CryptoError("Ed25519 seed must be \(seedBytes) bytes, got \(seed.count)") }
        let sk = SecretBytes(count: crypto_sign_secretkeybytes())
        var pk = [UInt8](repeating: 0, count: publicKeyBytes)
        // SAFETY: sk holds secretkeybytes(), pk publickeybytes(), seed seedbytes().
        let rc = pk.withUnsafeMutableBufferPointer { p in seed.withUnsafeBufferPointer { s in
            crypto_sign_seed_keypair(p.baseAddress!, sk.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self), s.baseAddress!)
        } }
        guard rc == 0 else { throw CryptoError("Ed25519 key pair derivation failed") }
        return (sk, pk)
    }

    static func sign(_ message: [UInt8], secret: SecretBytes) throws(CryptoError) -> [UInt8] {
        var sig = [UInt8](repeating: 0, count: signatureBytes)
        // SAFETY: sig holds signatureBytes; message passed with its length.
        let rc = sig.withUnsafeMutableBufferPointer { s in message.withUnsafeBufferPointer { m in
            crypto_sign_detached(s.baseAddress!, nil, m.baseAddress, UInt64(m.count), secret.pointer.baseAddress!.assumingMemoryBound(to: UInt8.self))
        } }
        guard rc == 0 else { throw CryptoError("Ed25519 signing failed") }
        return sig
    }

    static func verify(_ signature: [UInt8], _ message: [UInt8], publicKey: [UInt8]) -> Bool {
        guard signature.count == signatureBytes, publicKey.count == publicKeyBytes, (try? Sodium.ensureInitialized()) != nil else { return false }
        // SAFETY: lengths checked above.
        return signature.withUnsafeBufferPointer { s in message.withUnsafeBufferPointer { m in publicKey.withUnsafeBufferPointer { p in
            crypto_sign_verify_detached(s.baseAddress!, m.baseAddress, UInt64(m.count), p.baseAddress!) == 0
        } } }
    }
}
