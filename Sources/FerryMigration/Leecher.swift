// The leecher: pulls pages in the background in the heuristic's order with
// many requests in flight, learns which pulled pages were written since,
// finalizes when the policy says the rest is small, fills what is left by
// post-copy, checks the result against the frozen source, and only then
// confirms and writes the image. A dropped connection is resumed, not failed.
// This file is the orchestration; the pulling is the Puller's, where the
// pages go the Destination's.
import Foundation
import FerryToolkit

public struct LeecherOptions: Sendable {
    public var policy = FinalizePolicy()
    public var heuristic: any PullHeuristic = SequentialHeuristic()
    /// ReadAt requests in flight. 16 x 1 MiB keeps a loopback link and both
    /// cores busy without holding much memory.
    public var requestsInFlight = 16
    /// Pages per ReadAt (at most `MigrationLimits.maxPagesPerRead`); nil
    /// adapts the size to the link (`BatchSizer`).
    public var pagesPerRequest: Int? = nil
    /// How often pre-copy asks for the dirty set.
    public var syncInterval: Duration = .milliseconds(200)
    /// Compare every region with the frozen source's checksum before Complete.
    public var verify = true
    /// Abort instead of Complete at the end (the source is thawed): a dry run.
    public var abortAtEnd = false
    /// The seeder's key: its signature over the checksums must verify, so a
    /// hub in between cannot pose as the source (needs `verify`).
    public var seederKey: PublicKey? = nil
    /// With `seederKey`: the oldest signed freeze accepted, counted back from
    /// when this leecher started. A hub serves late leechers from a freeze
    /// made before they came, so this is not zero; an older statement is
    /// taken for an earlier migration of the same process replayed by a hub.
    public var maxFreezeAge: Duration = .seconds(600)
    /// The bandwidth cap (`--max-bandwidth`): each bulk ReadAt waits on it
    /// for the bytes it asks for (all-zero pages, which come back without
    /// bytes, are given back); touched pages never wait, only charge it.
    /// Nil: no cap.
    public var pacer: Pacer? = nil
    /// How post-copy paces its background fill while a consumer uses the
    /// pages (live memory).
    public var postCopy = PostCopyOptions()

    public init() {}
}

public struct LeecherProgress: Sendable {
    public var pagesTotal: Int
    public var pagesClean: Int
    public var pagesDirty: Int
    public var pagesRemote: Int
    public var bytesReceived: UInt64
    public var bytesPerSecond: Double
    public var dirtyPagesPerSecond: Double
    public var elapsedSeconds: Double
    public var phase: String
}

public enum LeecherEvent: Sendable {
    case connected(peer: String, pid: Int32, host: String, tracker: String, regions: Int, pages: Int)
    case progress(LeecherProgress)
    /// The policy finalizes; the reason names the limit neutrally unless
    /// the caller names it (`FinalizeReason.text(naming:)`).
    case finalizing(reason: FinalizeReason)
    case finalized(downtimeMilliseconds: Double, freezeMilliseconds: Double, dirtyPages: UInt64, remotePages: Int)
    case reconnecting(attempt: Int, reason: String)
    case resumed(phase: String)
    /// Every page is held: the checksum phase begins (the image, or the
    /// live memory, is hashed and compared with the frozen source's
    /// checksums). Nothing is confirmed to the seeder until it ends.
    case verifying(pages: Int)
    case verified(regions: Int)
    case complete(bytes: UInt64, seconds: Double, seederSays: String)
}

public struct LeecherSummary: Sendable {
    public var manifest: Manifest
    public var bytesReceived: UInt64
    public var seconds: Double
    public var downtimeMilliseconds: Double
    public var dirtyPagesAtFinalize: UInt64
    public var seederSays: String
}

public final class Leecher {
    public typealias Connector = SessionLink.Connector

    private let link: SessionLink
    private let destination: any Destination
    private let puller: Puller
    /// Issue 13: the whole-process restore (CriuRestore.swift); nil otherwise.
    private var restore: CriuRestore? = nil
    private let options: LeecherOptions
    private let events: @Sendable (LeecherEvent) -> Void

    private var seeder: TrackReply? = nil
    /// Wall-clock start, Unix milliseconds: signed freeze times are compared with it.
    private var startedWallMilliseconds: UInt64 = 0
    /// The Checksum call made at Finalize, cancelled if the migration fails.
    private var checksumCall: Task<[UInt8], any Error>? = nil

    /// `migration` names the migration wanted from a hub; empty for a seeder.
    public convenience init(connect: @escaping Connector, sink: ImageWriter, options: LeecherOptions = .init(),
                            migration: String = "", events: @escaping @Sendable (LeecherEvent) -> Void = { _ in }) {
        self.init(connect: connect, destination: sink, options: options, migration: migration, events: events)
    }

    /// A leecher whose pages end in live memory of this process: after
    /// Finalize, `memory.migratedMemory()` returns it while post-copy fills
    /// the rest, touched pages first (see LiveMemorySink and docs/postcopy.md).
    public convenience init(connect: @escaping Connector, memory: LiveMemorySink, options: LeecherOptions = .init(),
                            migration: String = "", events: @escaping @Sendable (LeecherEvent) -> Void = { _ in }) {
        self.init(connect: connect, destination: memory, options: options, migration: migration, events: events)
    }

    /// A leecher whose pages serve CRIU's restore of the whole process
    /// (CriuRestore.swift, Protocols/criu.md): its destination is the page
    /// store CRIU's lazy-pages daemon is answered from.
    public convenience init(connect: @escaping Connector, restore: CriuRestore, options: LeecherOptions = .init(),
                            migration: String = "", events: @escaping @Sendable (LeecherEvent) -> Void = { _ in }) {
        self.init(connect: connect, destination: restore.store, options: options, migration: migration, events: events)
        self.restore = restore
    }

    init(connect: @escaping Connector, destination: any Destination, options: LeecherOptions, migration: String,
         events: @escaping @Sendable (LeecherEvent) -> Void) {
        link = SessionLink(migration: migration, connect: connect) { event in
            switch event {
            case .reconnecting(let attempt, let reason): events(.reconnecting(attempt: attempt, reason: reason))
            case .resumed(let phase): events(.resumed(phase: phase.description))
            }
        }
        self.destination = destination
        self.options = options
        self.events = events
        puller = Puller(link: link, connect: connect, destination: destination, options: options, events: events)
    }

    /// Runs the whole migration. On error the seeder, if reachable, is told to
    /// abort, so the source runs on; no image is left behind.
    public func run() async throws -> LeecherSummary {
        let started = ContinuousClock.now
        startedWallMilliseconds = UInt64(max(0, Date().timeIntervalSince1970 * 1000))
        var restoring: Task<Void, any Error>? = nil
        do {
            let reply = try await openFirst()
            seeder = reply
            try puller.begin(layout: reply.layout, epoch: reply.layoutEpoch, started: started)
            events(.connected(peer: await link.peer, pid: reply.pid, host: reply.host,
                              tracker: reply.tracker, regions: reply.layout.count, pages: puller.store.totalPages))
            try await puller.pull(precopy: true)
            let (finalized, downtime) = try await puller.finalize()
            let layout = puller.layout
            try destination.sourceFrozen(layout: layout, clean: puller.store.ranges(in: [.clean]))
            // Whole-process restore: CRIU's images now, before post-copy
            // takes the link; CRIU restores the process beside post-copy.
            if let restore {
                try await restore.receiveImages(link: link)
                restoring = Task { try await restore.restoreProcess() }
            }
            // The source is frozen, so its checksums are final: the seeder
            // hashes it while post-copy runs and while we finish hashing the
            // image (its writer has hashed since Finalize) or the live memory.
            var request = WireWriter()
            request.ranges(layout.filter { $0.kind == .migrate }.map(\.range))
            let payload = request.bytes
            let expected: Task<[UInt8], any Error>? = options.verify ? Task { [link] in
                try await link.call(.checksum, payload)
            } : nil
            checksumCall = expected
            try await puller.pull(precopy: false)
            if options.verify { events(.verifying(pages: puller.store.totalPages)) }
            let manifest: Manifest
            do {
                manifest = try await destination.complete(layout: layout, sourcePid: reply.pid, sourceHost: reply.host,
                                                          tracker: reply.tracker, downtimeMilliseconds: downtime)
            } catch {
                expected?.cancel()
                throw error
            }
            if let expected { try verify(manifest, against: try await expected.value) }
            // Complete lets CRIU kill the source: the process must run here first.
            try await restoring?.value
            // Interrupted before Complete: abort instead (below).
            try Task.checkCancellation()
            let said: String
            if options.abortAtEnd {
                said = try OutcomeReply.decode(try await link.call(.abort, [])).message
            } else {
                said = try await completeOnce()
            }
            try destination.commit()
            await link.close()
            await puller.companion?.close()
            let seconds = puller.elapsed
            events(.complete(bytes: puller.bytesReceived, seconds: seconds, seederSays: said))
            return LeecherSummary(manifest: manifest, bytesReceived: puller.bytesReceived, seconds: seconds,
                                  downtimeMilliseconds: downtime,
                                  dirtyPagesAtFinalize: finalized.dirty.reduce(0) { $0 + $1.pageCount },
                                  seederSays: said)
        } catch {
            checksumCall?.cancel()
            restoring?.cancel()
            restore?.cancel()
            destination.fail("\(error)")
            // Cancelled (SIGINT, SIGTERM): say what became of the source, not
            // "CancellationError()".
            let cancelled = error is CancellationError || Task.isCancelled
            let source = seeder == nil ? "nothing was tracked or frozen yet: the source runs on as before"
                                       : await abortAfterFailure()
            await link.close()
            await puller.companion?.close()
            if cancelled { throw MigrationInterrupted(source: source) }
            throw error
        }
    }

    /// Best effort: the source must run on. A seeder that cannot be reached
    /// thaws it itself after its grace period. (An unstructured task: it is
    /// not cancelled with this one.) Returns what became of the source.
    private func abortAfterFailure() async -> String {
        let link = self.link
        let abort = Task<String, any Error> {
            let reply = try await link.call(.abort, [])
            return try OutcomeReply.decode(reply).message
        }
        let limit = Self.abortTimeout
        let timeout = Task {
            try? await Task.sleep(for: limit)
            abort.cancel()
        }
        defer { timeout.cancel() }
        switch await abort.result {
        case .success(let said):
            return said
        case .failure(let failure):
            let grace = Double(seeder?.graceMilliseconds ?? 5000) / 1000
            return "the seeder did not take the abort (\(failure is CancellationError ? "no answer within \(limit)" : "\(failure)")); it thaws the source itself once we are gone for its grace period (\(grace) s)"
        }
    }

    /// The first connection: handshake and Track. It is not resumed (there is
    /// no session yet), so a link lost here ends the migration; the error
    /// says at which step and that the source was never frozen. (The fault
    /// matrix's handshake cells: a seeder killed or a link cut mid-handshake
    /// used to end with only "127.0.0.1:N reset the connection", naming
    /// neither the seeder nor what became of the source.)
    private func openFirst() async throws -> TrackReply {
        do {
            return try await link.open()
        } catch let error as RPCError where error.code != .connectionClosed {
            throw error
        } catch let error where error is SocketError || error is RPCError || error is TransportError {
            // TransportError: a cut that lands on a send (EPIPE) rather than a read.
            throw MigrationError.connectionLost(
                "could not open the migration with the seeder (handshake and Track): \(error); the source was not frozen and runs on: run the leecher again")
        }
    }

    /// How long an abort may take once the migration failed or was cancelled.
    static let abortTimeout: Duration = .seconds(2)

    /// Complete, once: if the reply was lost with the connection, the resumed
    /// session says whether it went through.
    private func completeOnce() async throws -> String {
        do {
            return try OutcomeReply.decode(try await link.call(.complete, [])).message
        } catch {
            if await link.phase == .completed { return "completed (confirmed after reconnecting)" }
            // The image is verified, but the source is not ours: whether the
            // seeder applied Complete cannot be known. Say so, so the user
            // checks the source rather than trusts a half-told story.
            guard error is MigrationError, let seeder else { throw error }
            throw MigrationError.connectionLost(
                "the seeder did not confirm Complete (\(error)); the image was verified but is not kept, since the source may run on: if Complete reached the seeder, pid \(seeder.pid) on \(seeder.host) is left as its --then says (stopped by default: resume it with kill -CONT), otherwise the seeder thaws it")
        }
    }

    // MARK: - Verify

    /// Compares each migrated region of the image with the seeder's checksum of the frozen source.
    private func verify(_ manifest: Manifest, against encoded: [UInt8]) throws {
        let regions = manifest.regions.filter { $0.file != nil }
        let reply = try ChecksumReply.decode(encoded)
        if let pinned = options.seederKey, let seeder {
            let age = UInt64(max(0, options.maxFreezeAge.inSeconds) * 1000)
            try reply.verifySigned(by: pinned, pid: seeder.pid, host: seeder.host, layout: puller.layout,
                                   ranges: regions.map { AddressRange(start: $0.start, end: $0.end) },
                                   notFrozenBefore: startedWallMilliseconds > age ? startedWallMilliseconds - age : 0)
        }
        guard reply.digests.count == regions.count else {
            throw MigrationError.protocolViolation("the seeder sent \(reply.digests.count) checksums for \(regions.count) regions")
        }
        for (region, digest) in zip(regions, reply.digests) where digest.hexString != region.blake2b {
            throw MigrationError.image(
                "region 0x\(String(region.start, radix: 16))-0x\(String(region.end, radix: 16)) (\(region.name)) does not match the frozen source; the migration is aborted and the source thawed")
        }
        events(.verified(regions: regions.count))
    }
}
