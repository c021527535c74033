// The migration's request and reply messages, carried as RPC payloads
// (Protocols/migration.md): Track, Hello, ReadAt's request, Checksum and the
// outcome of Complete and Abort. ReadAt's reply parts are in PagePart.swift,
// Sync's and Finalize's dirty reports in DirtyReport.swift.

/// Track: start (or resume) the migration session.
public struct TrackRequest: Sendable, Equatable {
    public var version: UInt16 = MigrationLimits.version
    /// The session to resume after a dropped connection; nil starts a new one.
    public var resume: [UInt8]?
    /// The migration wanted, by name; empty for whatever the peer serves.
    /// A hub serving several seeders routes by it.
    public var migration: String

    /// A second connection to the session `resume` names, for priority
    /// reads beside the owner's bulk traffic (post-copy's touched pages): it
    /// may only ReadAt, and takes nothing from the owning connection.
    public var companion: Bool

    public init(resume: [UInt8]? = nil, migration: String = "", companion: Bool = false) {
        self.resume = resume
        self.migration = migration
        self.companion = companion
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.u16(version)
        w.bytes16(resume ?? [])
        w.text(migration)
        w.u8(companion ? 1 : 0)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> TrackRequest {
        var r = WireReader(bytes)
        let version = try r.u16("version")
        let resume = try r.bytes16("session", limit: 16)
        let migration = try r.text("migration")
        let flags = try r.u8("flags")
        guard flags <= 1 else { throw WireDecodeError("unknown Track flags 0x\(String(flags, radix: 16))") }
        try r.expectEnd("Track request")
        var request = TrackRequest(resume: resume.isEmpty ? nil : resume, migration: migration, companion: flags == 1)
        guard !request.companion || request.resume != nil else {
            throw WireDecodeError("a companion Track must name the session it joins")
        }
        request.version = version
        return request
    }
}

/// Hello: who serves what, with no side effect (a hub asks a seeder that
/// dialed in before any leecher wants it).
public struct HelloReply: Sendable, Equatable {
    public var migration: String
    public var pid: Int32
    public var host: String
    /// The session's phase, nil before any Track.
    public var phase: SessionPhase?

    public init(migration: String, pid: Int32, host: String, phase: SessionPhase?) {
        self.migration = migration
        self.pid = pid
        self.host = host
        self.phase = phase
    }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.text(migration)
        w.u32(UInt32(bitPattern: pid))
        w.text(host)
        w.u8(phase?.rawValue ?? 0xFF)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> HelloReply {
        var r = WireReader(bytes)
        let migration = try r.text("migration")
        let pid = Int32(bitPattern: try r.u32("pid"))
        let host = try r.text("host")
        let raw = try r.u8("phase")
        try r.expectEnd("Hello reply")
        guard raw == 0xFF || SessionPhase(rawValue: raw) != nil else { throw WireDecodeError("unknown session phase \(raw)") }
        return HelloReply(migration: migration, pid: pid, host: host, phase: SessionPhase(rawValue: raw))
    }
}

public struct TrackReply: Sendable, Equatable {
    public var session: [UInt8]
    public var phase: SessionPhase
    public var pid: Int32
    public var host: String
    public var tracker: String
    /// How long the seeder keeps a session whose leecher is gone, in milliseconds.
    public var graceMilliseconds: UInt32
    public var layoutEpoch: UInt64
    public var layout: [Region]

    public init(session: [UInt8], phase: SessionPhase, pid: Int32, host: String, tracker: String,
                graceMilliseconds: UInt32, layoutEpoch: UInt64, layout: [Region]) {
        self.session = session
        self.phase = phase
        self.pid = pid
        self.host = host
        self.tracker = tracker
        self.graceMilliseconds = graceMilliseconds
        self.layoutEpoch = layoutEpoch
        self.layout = layout
    }

    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 256 + layout.count * 64)
        w.bytes16(session)
        w.u8(phase.rawValue)
        w.u32(UInt32(bitPattern: pid))
        w.text(host)
        w.text(tracker)
        w.u32(graceMilliseconds)
        w.u64(layoutEpoch)
        w.regions(layout)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> TrackReply {
        var r = WireReader(bytes)
        let session = try r.bytes16("session", limit: 16)
        guard let phase = SessionPhase(rawValue: try r.u8("phase")) else { throw WireDecodeError("unknown session phase") }
        let pid = Int32(bitPattern: try r.u32("pid"))
        let host = try r.text("host")
        let tracker = try r.text("tracker")
        let grace = try r.u32("grace")
        let epoch = try r.u64("layout epoch")
        let layout = try r.regions()
        try r.expectEnd("Track reply")
        return TrackReply(session: session, phase: phase, pid: pid, host: host, tracker: tracker,
                          graceMilliseconds: grace, layoutEpoch: epoch, layout: layout)
    }
}

/// ReadAt: the pages of `ranges`, replied as streamed parts of page runs.
public struct ReadRequest: Sendable, Equatable {
    public var ranges: [AddressRange]
    public init(ranges: [AddressRange]) { self.ranges = ranges }

    public var pageCount: Int { ranges.reduce(0) { $0 + Int($1.pageCount) } }

    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 4 + ranges.count * 12)
        w.ranges(ranges)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> ReadRequest {
        var r = WireReader(bytes)
        let ranges = try r.ranges(maxPages: MigrationLimits.maxPagesPerRead)
        try r.expectEnd("ReadAt request")
        let request = ReadRequest(ranges: ranges)
        guard request.pageCount <= MigrationLimits.maxPagesPerRead else {
            throw WireDecodeError("ReadAt asks for \(request.pageCount) pages, limit \(MigrationLimits.maxPagesPerRead)")
        }
        return request
    }
}

/// Checksum: BLAKE2b-256 of each requested range of the frozen source,
/// signed by a seeder that has a key pair (SeederSignature.swift).
public struct ChecksumReply: Sendable, Equatable {
    public var digests: [[UInt8]]
    public var signature: ChecksumSignature? = nil

    public func encode() -> [UInt8] {
        var w = WireWriter(capacity: 4 + digests.count * 34 + 128)
        w.u32(UInt32(digests.count))
        for d in digests { w.bytes16(d) }
        if let signature {
            w.u8(1)
            signature.encode(into: &w)
        } else {
            w.u8(0)
        }
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> ChecksumReply {
        var r = WireReader(bytes)
        let count = Int(try r.u32("digest count"))
        guard count <= MigrationLimits.maxRegions, count * 34 <= r.remaining else {
            throw WireDecodeError("\(count) digests announced")
        }
        var digests: [[UInt8]] = []
        for _ in 0..<count { digests.append(try r.bytes16("digest", limit: 64)) }
        let signature: ChecksumSignature?
        switch try r.u8("signature flag") {
        case 0: signature = nil
        case 1: signature = try ChecksumSignature.decode(&r)
        case let other: throw WireDecodeError("unknown checksum signature flag \(other)")
        }
        try r.expectEnd("Checksum reply")
        return ChecksumReply(digests: digests, signature: signature)
    }
}

/// Complete / Abort replies: what the seeder did to the process, as text.
public struct OutcomeReply: Sendable, Equatable {
    public var message: String
    public init(message: String) { self.message = message }

    public func encode() -> [UInt8] {
        var w = WireWriter()
        w.text(message)
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> OutcomeReply {
        var r = WireReader(bytes)
        let message = try r.text("outcome")
        try r.expectEnd("outcome reply")
        return OutcomeReply(message: message)
    }
}
