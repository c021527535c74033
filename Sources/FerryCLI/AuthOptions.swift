// The credential flags every command shares, and the default that makes a
// migration on one machine work without set-up: a root-only secret file that
// the seeder creates on first use and the leecher on the same machine reads.
import ArgumentParser
import Foundation
import FerryMigration

public struct AuthOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp(
        "A file holding the pre-shared secret (`seeder secret` makes one); the same file on both sides.",
        valueName: "FILE"))
    public var secretFile: String?

    @Option(name: .long, help: ArgumentHelp(
        "Our private key file (`keygen` makes one). Use with --authorized.", valueName: "FILE"))
    public var key: String?

    @Option(name: .long, help: ArgumentHelp(
        "Public keys we accept, one per line, like SSH's authorized_keys.", valueName: "FILE"))
    public var authorized: String?

    @Option(name: .long, help: ArgumentHelp(
        "Accept only this peer public key (the line of its .pub file, or a file holding it).",
        valueName: "KEY|FILE"))
    public var peerKey: String?

    public init() {}

    /// A public key given on the command line: the line of a .pub file, or
    /// the path of a file whose first line is one.
    public static func publicKey(_ text: String) throws -> PublicKey {
        if FileManager.default.fileExists(atPath: text) {
            let line = try String(contentsOfFile: text, encoding: .utf8)
                .split(separator: "\n").first.map(String.init) ?? ""
            return try PublicKey(text: line)
        }
        return try PublicKey(text: text)
    }

    /// Where the single-machine default secret lives.
    public static var defaultSecretPath: String {
        let base = ProcessInfo.processInfo.environment["XDG_CONFIG_HOME"]
            ?? (NSHomeDirectory() + "/.config")
        return base + "/ferry/secret"
    }

    public func validate() throws {
        if secretFile != nil && (key != nil || authorized != nil) {
            throw ValidationError("choose one way to authenticate: --secret-file, or --key with --authorized")
        }
        if key != nil && authorized == nil && peerKey == nil {
            throw ValidationError("--key needs --authorized FILE (or --peer-key) to say which peers to accept")
        }
        if key == nil && (authorized != nil || peerKey != nil) {
            throw ValidationError("--authorized and --peer-key need --key FILE, our own private key")
        }
    }

    /// The credentials the flags describe. Without flags, the default secret:
    /// created when `createDefault` (the seeder), required otherwise.
    public func credentials(createDefault: Bool) throws -> Credentials {
        try Self.credentials(secretFile: secretFile, key: key, authorized: authorized, peerKey: peerKey,
                             createDefault: createDefault)
    }

    static func credentials(secretFile: String?, key: String?, authorized: String?, peerKey: String?,
                            createDefault: Bool) throws -> Credentials {
        if let key {
            let pair = try KeyPair.load(path: key)
            let accepted = try authorized.map { try AuthorizedKeys.load(path: $0) } ?? AuthorizedKeys([])
            let pinned = try peerKey.map { try publicKey($0) }
            return .keys(pair, authorized: accepted, pinnedPeer: pinned)
        }
        let path = secretFile ?? Self.defaultSecretPath
        if secretFile == nil && createDefault && !FileManager.default.fileExists(atPath: path) {
            let directory = (path as NSString).deletingLastPathComponent
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                    attributes: [.posixPermissions: 0o700])
            do {
                try PreSharedSecret.generate().save(path: path)
            } catch is KeyFileError where FileManager.default.fileExists(atPath: path) {
                // Another seeder made it first: read theirs below.
            } catch {
                throw ValidationError("cannot create the default secret file \(path) (\(error)); pass --secret-file")
            }
        }
        guard FileManager.default.fileExists(atPath: path) else {
            throw ValidationError(secretFile == nil
                ? "no credentials given and no default secret at \(path): pass --secret-file FILE (the seeder's), or --key and --authorized"
                : "secret file \(path) does not exist (`seeder secret > FILE` makes one)")
        }
        return .preSharedSecret(try PreSharedSecret.load(path: path))
    }
}

/// The hub's credentials toward its upstream seeders, beside `AuthOptions`
/// for its leechers: a hub authenticates both ways, with separate lists.
public struct UpstreamAuthOptions: ParsableArguments {
    @Option(name: .customLong("upstream-secret-file"), help: ArgumentHelp(
        "Pre-shared secret shared with the seeders (default: the leecher-side one).", valueName: "FILE"))
    public var secretFile: String?

    @Option(name: .customLong("upstream-key"), help: ArgumentHelp(
        "Private key presented to seeders (default: --key).", valueName: "FILE"))
    public var key: String?

    @Option(name: .customLong("upstream-authorized"), help: ArgumentHelp(
        "Seeder public keys accepted.", valueName: "FILE"))
    public var authorized: String?

    @Option(name: .customLong("upstream-peer-key"), help: ArgumentHelp(
        "Accept only this seeder key.", valueName: "KEY|FILE"))
    public var peerKey: String?

    public init() {}

    /// Falls back to the leecher-side flags for whatever is not given.
    public func credentials(fallback: AuthOptions) throws -> Credentials {
        if secretFile == nil && key == nil && authorized == nil && peerKey == nil {
            return try fallback.credentials(createDefault: false)
        }
        return try AuthOptions.credentials(secretFile: secretFile, key: key ?? fallback.key,
                                           authorized: authorized, peerKey: peerKey, createDefault: false)
    }
}
