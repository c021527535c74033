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
import FerryToolkit

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
        if Self.isWeak(b) {
            throw KeyFileError(path: path, line: nil, problem: "the secret is not random (\(Set(b).count) distinct byte values, a random one has about 30); replace it with the output of `seeder secret`")
        }
        try self.init(bytes: b)
    }

    /// Fewest distinct byte values a secret read from a file may have. A
    /// random 32-byte secret has about 30; one with fewer than 16 turns up
    /// with probability below 10^-15, while all-zero, one repeated byte and
    /// short repeated patterns (`0123…ef` four times) all fall under it.
    public static let minimumDistinctBytes = 16

    /// True for secrets nobody drew at random: all zero, one byte repeated,
    /// a short pattern repeated.
    static func isWeak(_ bytes: [UInt8]) -> Bool {
        Set(bytes).count < minimumDistinctBytes
    }

    /// Writes the secret file (mode 0600). Refuses an existing file or a
    /// symbolic link at `path` unless `replace`, which swaps in a new file
    /// (a link is replaced, never followed).
    public func save(path: String, replace: Bool = false) throws {
        try KeyFiles.write(path, text + "\n", mode: 0o600, replace: replace)
    }

    /// Loads a secret file; refuses links, anything but a regular file, files
    /// owned by others, files group or others can access, and weak secrets.
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

    /// Writes the private key (mode 0600) and the public key line (0644).
    /// Without `replace`, refuses when either path exists, even as a
    /// dangling symbolic link, and writes neither; with it, each file is
    /// written beside its path and renamed over it, so a link planted at
    /// either path is replaced, never followed.
    public func save(privatePath: String, publicPath: String, comment: String? = nil, replace: Bool = false) throws {
        var pub = publicKey.text
        if let c = comment, !c.isEmpty { pub += " " + c }
        if !replace {
            for path in [privatePath, publicPath] where KeyFiles.exists(path) {
                throw KeyFileError(path: path, line: nil, problem: "already exists; pass --force to replace it")
            }
        }
        try KeyFiles.write(privatePath, privateText + "\n", mode: 0o600, replace: replace)
        do {
            try KeyFiles.write(publicPath, pub + "\n", mode: 0o644, replace: replace)
        } catch {
            if !replace { _ = unlink(privatePath) }  // ours: created exclusively just above
            throw error
        }
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
    static func errnoText() -> String { SystemError.text(errno) }
    /// The errno text of a failed `checkedCall`.
    static func text(of error: any Error) -> String {
        (error as? SystemError).map { SystemError.text($0.errno) } ?? "\(error)"
    }

    static func read(_ path: String, limit: Int = 1 << 20) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot open: \(errnoText())") }
        defer { _ = Glibc.close(fd) }
        return try read(fd: fd, path: path, limit: limit)
    }

    static func read(fd: Int32, path: String, limit: Int = 1 << 20) throws -> String {
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n: Int
            do {
                n = try checkedCall("read", on: path) { buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) } }
            } catch {
                throw KeyFileError(path: path, line: nil, problem: "cannot read: \(Self.text(of: error))")
            }
            if n == 0 { break }
            out.append(contentsOf: buf[0..<n])
            guard out.count <= limit else { throw KeyFileError(path: path, line: nil, problem: "file is larger than \(limit) bytes; is this the right file?") }
        }
        Sodium.wipe(&buf)
        return String(decoding: out, as: UTF8.self)
    }

    /// True when something, even a dangling symbolic link, is at `path`.
    static func exists(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0
    }

    /// Reads a secret file, like ssh: refuses a symbolic link, anything but
    /// a regular file, a file owned by someone other than us or root, and a
    /// file group or others can access. The checks are made with `fstat` on
    /// the descriptor that is then read, so the file cannot be swapped
    /// between check and read.
    static func readPrivate(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            if errno == ELOOP {
                throw KeyFileError(path: path, line: nil, problem: "is a symbolic link; a file holding a secret must be a regular file (pass the link's target)")
            }
            throw KeyFileError(path: path, line: nil, problem: "cannot open: \(errnoText())")
        }
        defer { _ = Glibc.close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot stat: \(errnoText())") }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw KeyFileError(path: path, line: nil, problem: "is not a regular file; a secret must be kept in a plain file")
        }
        let me = geteuid()
        guard st.st_uid == me || st.st_uid == 0 else {
            throw KeyFileError(path: path, line: nil, problem: "is owned by uid \(st.st_uid), not by us (uid \(me)) or root: its owner can read or replace the secret; run `chown \(me) \(path)`")
        }
        let mode = st.st_mode & 0o777
        guard mode & 0o077 == 0 else {
            throw KeyFileError(path: path, line: nil, problem: "permissions \(String(mode, radix: 8)) are too open: the file holds a secret; run `chmod 600 \(path)`")
        }
        return try read(fd: fd, path: path)
    }

    /// Writes a new file with `mode`. Without `replace` the file is created
    /// exclusively (`O_EXCL`, which also refuses any symbolic link at
    /// `path`). With `replace`, it is created exclusively under a temporary
    /// name in the same directory and renamed over `path`: whatever was at
    /// `path`, a link included, is replaced, and no link is followed.
    static func write(_ path: String, _ text: String, mode: mode_t, replace: Bool = false) throws {
        let target = replace ? try temporaryName(beside: path) : path
        let fd = open(target, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard fd >= 0 else {
            if errno == EEXIST {
                throw KeyFileError(path: path, line: nil, problem: "already exists; pass --force to replace it")
            }
            throw KeyFileError(path: path, line: nil, problem: "cannot create: \(errnoText())")
        }
        var done = false
        defer {
            _ = Glibc.close(fd)
            if !done { _ = unlink(target) }
        }
        guard fchmod(fd, mode) == 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot set mode \(String(mode, radix: 8)): \(errnoText())") }
        var bytes = Array(text.utf8)
        defer { Sodium.wipe(&bytes) }
        var off = 0
        while off < bytes.count {
            let n: Int
            do {
                n = try checkedCall("write", on: path) { bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, $0.count - off) } }
            } catch {
                throw KeyFileError(path: path, line: nil, problem: "cannot write: \(Self.text(of: error))")
            }
            off += n
        }
        guard fsync(fd) == 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot write: \(errnoText())") }
        if replace {
            guard rename(target, path) == 0 else { throw KeyFileError(path: path, line: nil, problem: "cannot replace: \(errnoText())") }
        }
        done = true
    }

    /// `DIR/.NAME.XXXXXXXX`, a name beside `path` that is not in use yet.
    static func temporaryName(beside path: String) throws -> String {
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { String(path[...$0]) } ?? ""
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let random = try Sodium.randomBytes(6).hexString
        return "\(dir).\(name).\(random)"
    }
}
