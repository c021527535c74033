// Credentials on disk: the pre-shared secret, Ed25519 key pairs, and the
// authorized-keys list. Formats (Protocols/wire.md § Credential files):
//
//   secret file      one line: 64 hexadecimal digits (256 bits); `#` comments allowed
//   private key      one line: `ferry-ed25519-private <base64 32-byte seed>`; mode 0600
//   public key       one line: `ferry-ed25519 <base64 32-byte key> [comment]`
//   authorized keys  one public key line per key; blank lines and `#` comments ignored

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A credential file is missing, unreadable, too open, or malformed.
public struct KeyFileError: Error, CustomStringConvertible, Sendable, Equatable {
    public var path: String
    public var line: Int?
    public var problem: String

    public var description: String {
        if let line { return "\(path) line \(line): \(problem)" }
        return "\(path): \(problem)"
    }
}

/// The 256-bit secret both peers hold in pre-shared-secret mode.
public struct PreSharedSecret: Sendable {
    let secret: SecretBytes
    /// Bytes of a secret (32).
    public static let byteCount = 32

    public init(bytes: [UInt8]) throws {
        guard bytes.count == Self.byteCount else {
            throw CryptoError("a pre-shared secret is \(Self.byteCount) bytes, got \(bytes.count)")
        }
        secret = SecretBytes(bytes)
    }

    /// A new random secret.
    public static func generate() throws -> PreSharedSecret {
        var b = try Sodium.randomBytes(byteCount)
        defer { Sodium.wipe(&b) }
        return try PreSharedSecret(bytes: b)
    }

    /// The secret as one line of text (64 lowercase hex digits), as `seeder secret` prints it.
    public var text: String { secret.bytes.hexString }

    /// Parses the text form (surrounding whitespace ignored).
    public init(text: String, path: String = "secret") throws {
        var lineNo = 0
        var found: [UInt8]? = nil
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingWhitespace
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard found == nil else {
                throw KeyFileError(path: path, line: lineNo, problem: "more than one secret in the file; keep exactly one line of 64 hexadecimal digits")
            }
            guard line.utf8.count == 2 * Self.byteCount, let b = [UInt8](hex: String(line)) else {
                throw KeyFileError(path: path, line: lineNo, problem: "expected 64 hexadecimal digits (a 256-bit secret as printed by `seeder secret`), found \(line.utf8.count) characters")
            }
            found = b
        }
        guard var b = found else { throw KeyFileError(path: path, line: nil, problem: "no secret found; create one with `seeder secret > \(path)`") }
        defer { Sodium.wipe(&b) }
        try self.init(bytes: b)
    }

    /// Loads a secret file; refuses files that group or others can read.
    public static func load(path: String) throws -> PreSharedSecret {
        let text = try KeyFiles.readPrivate(path)
        return try PreSharedSecret(text: text, path: path)
    }
}

/// An Ed25519 public key: a peer's identity.
public struct PublicKey: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]
    public static let keyType = "ferry-ed25519"

    public init(bytes: [UInt8]) throws {
        guard bytes.count == Ed25519.publicKeyBytes else {
            throw CryptoError("an Ed25519 public key is \(Ed25519.publicKeyBytes) bytes, got \(bytes.count)")
        }
        self.bytes = bytes
    }

    /// Parses `ferry-ed25519 <base64> [comment]`.
    public init(text: String) throws {
        try self.init(text: text, path: "public key", line: nil)
    }

    init(text: String, path: String, line: Int?) throws {
        let fields = text.split(whereSeparator: { $0 == " " || $0 == "\t" })
        guard fields.count >= 2 else {
            throw KeyFileError(path: path, line: line, problem: "expected `\(Self.keyType) <base64 key> [comment]`, found \(fields.count) field(s)")
        }
        guard fields[0] == Self.keyType else {
            throw KeyFileError(path: path, line: line, problem: "unknown key type '\(fields[0])' (expected \(Self.keyType); create keys with `seeder keygen` or `leecher keygen`)")
        }
        guard let b = Sodium.unbase64(String(fields[1]), maxBytes: 64), b.count == Ed25519.publicKeyBytes else {
            throw KeyFileError(path: path, line: line, problem: "the key is not valid base64 of \(Ed25519.publicKeyBytes) bytes")
        }
        try self.init(bytes: b)
    }

    /// `ferry-ed25519 <base64>`.
    public var text: String { "\(Self.keyType) \(Sodium.base64(bytes))" }
    public var description: String { text }

    /// True when `signature` is this key's Ed25519 signature over `message`.
    public func isValidSignature(_ signature: [UInt8], of message: [UInt8]) -> Bool {
        Ed25519.verify(signature, message, publicKey: bytes)
    }

    /// Bytes of an Ed25519 signature (64).
    public static var signatureByteCount: Int { Ed25519.signatureBytes }

    /// A short form for messages: the first 16 base64 characters.
    public var shortText: String { String(Sodium.base64(bytes).prefix(16)) + "…" }
}

/// A static Ed25519 identity.
public struct KeyPair: Sendable {
    public let publicKey: PublicKey
    let seed: SecretBytes
    let secret: SecretBytes

    init(seed seedBytes: [UInt8]) throws {
        let (sk, pk) = try Ed25519.keyPair(seed: seedBytes)
        seed = SecretBytes(seedBytes)
        secret = sk
        publicKey = try PublicKey(bytes: pk)
    }

    public static func generate() throws -> KeyPair {
        var s = try Sodium.randomBytes(Ed25519.seedBytes)
        defer { Sodium.wipe(&s) }
        return try KeyPair(seed: s)
    }

    /// Deterministic key pair from a 32-byte seed (test vectors).
    public static func fromSeed(_ seed: [UInt8]) throws -> KeyPair { try KeyPair(seed: seed) }

    static let privateKeyType = "ferry-ed25519-private"

    /// The private key file's one line.
    var privateText: String { "\(Self.privateKeyType) \(Sodium.base64(seed.bytes))" }

    /// Loads a private key file (mode must not give group or others access).
    public static func load(path: String) throws -> KeyPair {
        let text = try KeyFiles.readPrivate(path)
        var lineNo = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingWhitespace
            if line.isEmpty || line.hasPrefix("#") { continue }
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count == 2, f[0] == privateKeyType else {
                if f.first == Substring(PublicKey.keyType) {
                    throw KeyFileError(path: path, line: lineNo, problem: "this is a public key; pass the private key file (written by `keygen` next to the .pub file)")
                }
                throw KeyFileError(path: path, line: lineNo, problem: "expected `\(privateKeyType) <base64 seed>`")
            }
            guard var seed = Sodium.unbase64(String(f[1]), maxBytes: 64), seed.count == Ed25519.seedBytes else {
                throw KeyFileError(path: path, line: lineNo, problem: "the private key is not valid base64 of \(Ed25519.seedBytes) bytes")
            }
            defer { Sodium.wipe(&seed) }
            return try KeyPair(seed: seed)
        }
        throw KeyFileError(path: path, line: nil, problem: "no private key found; create one with `seeder keygen` or `leecher keygen`")
    }

    /// Writes the private key (mode 0600, created or replaced) and the public key line.
    public func save(privatePath: String, publicPath: String, comment: String? = nil) throws {
        try KeyFiles.write(privatePath, privateText + "\n", mode: 0o600)
        var pub = publicKey.text
        if let c = comment, !c.isEmpty { pub += " " + c }
        try KeyFiles.write(publicPath, pub + "\n", mode: 0o644)
    }

    /// An Ed25519 signature over `message`: the handshake's identity proof,
    /// and the seeder's signed checksums that a hub relays untouched.
    public func sign(_ message: [UInt8]) throws -> [UInt8] { try Ed25519.sign(message, secret: secret) }
}

/// The public keys a peer accepts, like SSH's authorized_keys.
public struct AuthorizedKeys: Sendable {
    public private(set) var keys: [PublicKey]
    private var set: Set<PublicKey>

    public init(_ keys: [PublicKey]) { self.keys = keys; self.set = Set(keys) }

    public init(text: String, path: String = "authorized keys") throws {
        var ks: [PublicKey] = []
        var lineNo = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingWhitespace
            if line.isEmpty || line.hasPrefix("#") { continue }
            ks.append(try PublicKey(text: String(line), path: path, line: lineNo))
        }
        self.init(ks)
    }

    public static func load(path: String) throws -> AuthorizedKeys {
        try AuthorizedKeys(text: try KeyFiles.read(path), path: path)
    }

    public func contains(_ k: PublicKey) -> Bool { set.contains(k) }
    public var isEmpty: Bool { keys.isEmpty }
}

extension Substring {
    var trimmingWhitespace: Substring {
        var s = self
        while let c = s.first, c == " " || c == "\t" || c == "\r" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\r" { s.removeLast() }
        return s
    }
}

/// Small file helpers (no Foundation, so the fuzz build stays lean).
enum KeyFiles {
    static func errnoText() -> String { String(cString: strerror(errno)) }

    static func read(_ path: String, limit: Int = 1 << 20) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot open: \(errnoText())") }
        defer { _ = Glibc.close(fd) }
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { if errno == EINTR { continue }; throw KeyFileError(path: path, line: nil, problem: "cannot read: \(errnoText())") }
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
            guard out.count <= limit else { throw KeyFileError(path: path, line: nil, problem: "file is larger than \(limit) bytes; is this the right file?") }
        }
        Sodium.wipe(&buf)
        return String(decoding: out, as: UTF8.self)
    }

    /// Reads a secret file, refusing it when group or others have any access (like ssh).
    static func readPrivate(_ path: String) throws -> String {
        var st = stat()
        guard stat(path, &st) == 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot open: \(errnoText())") }
        let mode = st.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            throw KeyFileError(path: path, line: nil, problem: "permissions \(String(mode, radix: 8)) are too open: the file holds a secret; run `chmod 600 \(path)`")
        }
        return try read(path)
    }

    static func write(_ path: String, _ text: String, mode: mode_t) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot create: \(errnoText())") }
        defer { _ = Glibc.close(fd) }
        guard fchmod(fd, mode) == 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot set mode \(String(mode, radix: 8)): \(errnoText())") }
        var bytes = Array(text.utf8)
        defer { Sodium.wipe(&bytes) }
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) }
            if n < 0 { if errno == EINTR { continue }; throw KeyFileError(path: path, line: nil, problem: "cannot write: \(errnoText())") }
            off += n
        }
    }
}
