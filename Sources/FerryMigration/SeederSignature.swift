// The seeder's signature over its checksums: what lets a leecher pin the
// source's key through any number of hubs. Each hop of a hub chain is its own
// secure channel, so the channel proves who the *hub* is, never who the
// source is. A seeder with a key pair therefore signs the statement "the
// frozen process PID on HOST, with this final layout, has these checksums
// over these ranges"; hubs cache and forward the reply byte for byte, and a
// leecher pinning the seeder's key checks the signature, then its image
// against the checksums. A hub that alters a page, the layout or the process
// identity is caught; one that drops the signature is caught by a pinned
// leecher only (Protocols/migration.md § 3.5).
import FerryWire
#if canImport(Glibc)
import Glibc
#endif

/// The signature block of a Checksum reply.
public struct ChecksumSignature: Sendable, Equatable {
    /// The key that signed: lets an error name who signed instead of whom we pinned.
    public var signer: PublicKey
    /// The seeder's own session id (a hub's leechers see the hub's ids):
    /// makes every signed statement unique to one migration.
    public var session: [UInt8]
    /// When the seeder froze the process, Unix time in milliseconds: an old
    /// statement replayed by a hub shows its age.
    public var frozenAtMilliseconds: UInt64
    public var signature: [UInt8]

    /// The domain label: a signature made for anything else never verifies here.
    static let label = Array("ferry-checksum-v1".utf8) + [0]

    func encode(into w: inout WireWriter) {
        w.raw(signer.bytes)
        w.bytes16(session)
        w.u64(frozenAtMilliseconds)
        w.raw(signature)
    }

    static func decode(_ r: inout WireReader) throws -> ChecksumSignature {
        let key = try PublicKey(bytes: try r.raw(32, "signer key"))
        let session = try r.bytes16("seeder session", limit: 16)
        let frozenAt = try r.u64("frozen at")
        let signature = try r.raw(PublicKey.signatureByteCount, "signature")
        return ChecksumSignature(signer: key, session: session, frozenAtMilliseconds: frozenAt, signature: signature)
    }

    /// The signed bytes: label, pid, host, seeder session, freeze time, the
    /// BLAKE2b-256 of the final layout's region list encoding, the ranges
    /// asked and their digests, in the encodings of the protocol.
    static func statement(pid: Int32, host: String, session: [UInt8], frozenAtMilliseconds: UInt64,
                          layout: [Region], ranges: [AddressRange], digests: [[UInt8]]) -> [UInt8] {
        var encodedLayout = WireWriter(capacity: layout.count * 64)
        encodedLayout.regions(layout)
        var hasher = Blake2b256()
        encodedLayout.bytes.withUnsafeBytes { hasher.update($0) }
        var w = WireWriter(capacity: 128 + ranges.count * 12 + digests.count * 34)
        w.raw(label)
        w.u32(UInt32(bitPattern: pid))
        w.text(host)
        w.bytes16(session)
        w.u64(frozenAtMilliseconds)
        w.raw(hasher.finish())
        w.ranges(ranges)
        w.u32(UInt32(digests.count))
        for digest in digests { w.bytes16(digest) }
        return w.bytes
    }
}

/// Why a pinned leecher refused the checksums it was given.
public enum SeederSignatureError: Error, CustomStringConvertible, Sendable {
    case unsigned(pinned: PublicKey)
    case otherSigner(pinned: PublicKey, signer: PublicKey)
    case invalid(pinned: PublicKey)
    /// A valid signature over a freeze older than the leecher accepts.
    case stale(frozenAtMilliseconds: UInt64, oldestMilliseconds: UInt64)

    public var description: String {
        let outcome = "the migration is aborted and the source thawed"
        switch self {
        case .unsigned(let pinned):
            return "the checksums are not signed, but --seeder-key pins the seeder's key \(pinned.shortText): either the seeder runs without a key pair (start it with --key or --signing-key), or a hub in between replaced its answer; \(outcome)"
        case .otherSigner(let pinned, let signer):
            return "the checksums are signed by \(signer.shortText), not by the pinned seeder key \(pinned.shortText): the source (or a hub posing as it) is not the one you pinned; \(outcome)"
        case .invalid(let pinned):
            return "the signature over the checksums does not verify with the pinned seeder key \(pinned.shortText): a hub in between altered the checksums, the layout or the process identity; \(outcome)"
        case .stale(let frozenAt, let oldest):
            let age = Double(oldest > frozenAt ? oldest - frozenAt : 0) / 1000
            return "the signed checksums are of a freeze at \(Self.utc(frozenAt)), \(String(format: "%.0f", age)) s before the oldest this leecher accepts (\(Self.utc(oldest))): a hub may be replaying an earlier migration of the same process; if a hub really froze the source that long ago, raise --max-freeze-age; \(outcome)"
        }
    }

    static func utc(_ milliseconds: UInt64) -> String {
        var seconds = time_t(milliseconds / 1000)
        var parts = tm()
        gmtime_r(&seconds, &parts)
        return String(format: "%04d-%02d-%02d %02d:%02d:%02d UTC", parts.tm_year + 1900, parts.tm_mon + 1, parts.tm_mday,
                      parts.tm_hour, parts.tm_min, parts.tm_sec)
    }
}

extension ChecksumReply {
    /// Checks that the pinned seeder signed exactly these digests, for this
    /// process and this final layout, at a freeze no older than
    /// `notFrozenBefore` (Unix milliseconds): a statement replayed from an
    /// earlier migration of the same process shows its age. The digests are
    /// then compared with the image by the caller, as without pinning.
    public func verifySigned(by pinned: PublicKey, pid: Int32, host: String, layout: [Region],
                             ranges: [AddressRange], notFrozenBefore: UInt64 = 0) throws {
        guard let signature else { throw SeederSignatureError.unsigned(pinned: pinned) }
        guard signature.signer == pinned else {
            throw SeederSignatureError.otherSigner(pinned: pinned, signer: signature.signer)
        }
        let statement = ChecksumSignature.statement(
            pid: pid, host: host, session: signature.session,
            frozenAtMilliseconds: signature.frozenAtMilliseconds, layout: layout, ranges: ranges, digests: digests)
        guard pinned.isValidSignature(signature.signature, of: statement) else {
            throw SeederSignatureError.invalid(pinned: pinned)
        }
        guard signature.frozenAtMilliseconds >= notFrozenBefore else {
            throw SeederSignatureError.stale(frozenAtMilliseconds: signature.frozenAtMilliseconds, oldestMilliseconds: notFrozenBefore)
        }
    }

    /// Signs the reply as the seeder of `pid` on `host`.
    mutating func sign(with key: KeyPair, pid: Int32, host: String, session: [UInt8],
                       frozenAtMilliseconds: UInt64, layout: [Region], ranges: [AddressRange]) throws {
        let statement = ChecksumSignature.statement(
            pid: pid, host: host, session: session, frozenAtMilliseconds: frozenAtMilliseconds,
            layout: layout, ranges: ranges, digests: digests)
        signature = ChecksumSignature(signer: key.publicKey, session: session,
                                      frozenAtMilliseconds: frozenAtMilliseconds,
                                      signature: try key.sign(statement))
    }
}
