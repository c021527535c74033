// Whole migrations on this machine: a real multi-threaded workload under
// write load with mapping churn, a real seeder tracking it over real TCP on
// 127.0.0.1 with the secure channel, and a leecher writing an image. After
// Complete (the source is left stopped) the image must equal the source's
// memory byte for byte, region for region.
import Foundation
import Testing
import Synchronization
import FerryTestSupport
@testable import FerryMigration

/// An authenticated loopback server on an ephemeral port, for one test:
/// every connection is taken through the secure channel, then to `serve`.
final class LoopbackServer: Sendable {
    let listener: Listener
    let secret: PreSharedSecret
    let acceptTask: Task<Void, Never>

    init(secret: PreSharedSecret, serve: @escaping @Sendable (FrameTransport) async -> Void) async throws {
        listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        self.secret = secret
        let listener = listener
        acceptTask = Task {
            while let transport = try? await listener.accept() {
                Task {
                    guard let channel = try? await SecureChannel.server(over: transport,
                                                                        credentials: .preSharedSecret(secret)) else {
                        transport.close()
                        return
                    }
                    await serve(channel)
                }
            }
        }
    }

    func connector() -> Leecher.Connector {
        let (endpoint, secret) = (listener.endpoint, secret)
        return {
            let transport = try await Transports.connect(to: endpoint)
            return try await SecureChannel.client(over: transport, credentials: .preSharedSecret(secret))
        }
    }

    func close() {
        listener.close()
        acceptTask.cancel()
    }
}

/// A seeder service on an ephemeral loopback port, for one test.
final class LoopbackSeeder: Sendable {
    let service: SeederService
    let server: LoopbackServer
    var listener: Listener { server.listener }
    var secret: PreSharedSecret { server.secret }

    init(process: any MemorySource, then: ThenAction = .stop, grace: Duration = .seconds(3),
         signingKey: KeyPair? = nil) async throws {
        var options = SeederOptions(then: then, grace: grace)
        options.signingKey = signingKey
        let service = SeederService(source: process, options: options)
        self.service = service
        server = try await LoopbackServer(secret: try PreSharedSecret.generate()) { await service.serve($0) }
    }

    func connector() -> Leecher.Connector { server.connector() }
    func close() { server.close() }
}

func scratchDirectory(_ name: String) -> String {
    let path = "/tmp/ferry-e2e-\(getpid())-\(name)"
    try? FileManager.default.removeItem(atPath: path)
    return path
}

@Suite(.serialized) struct EndToEndTests {
    /// The busy workload most tests migrate: threads, churn, heap growth, zaps, shared memory.
    static let busyWorkload = ["--mib", "48", "--threads", "3", "--rate", "20000", "--churn", "--heap-grow",
                               "--zap", "--shared", "4", "--memfd", "4", "--pattern"]

    func migrate(tracker: TrackerKind?, heuristic: String = "sequential", finalizeAt: Double = 0.95,
                 workload: [String] = busyWorkload, name: String) async throws {
        let child = try Memwriter(workload)
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid, tracker: tracker)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory(name)
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        if heuristic == "profile" {
            // A recorded access order: the main region's last pages first, backwards.
            let main = try #require(child.regions["main"])
            let lines = stride(from: main.end - pageSize, to: main.end - 256 * pageSize, by: -Int(pageSize))
                .map { "0x" + String($0, radix: 16) }
            let path = out + ".profile"
            defer { try? FileManager.default.removeItem(atPath: path) }
            try (["# recorded by a test"] + lines).joined(separator: "\n").write(toFile: path, atomically: true, encoding: .utf8)
            options.heuristic = try HeuristicName.make("profile:" + path)
        } else {
            options.heuristic = try HeuristicName.make(heuristic)
        }
        options.policy = FinalizePolicy(cleanShare: finalizeAt, maxWaitSeconds: 10)
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        let summary = try await leecher.run()
        #expect(await seeder.service.outcome() == .completed("pid \(child.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"))
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
        #expect(report.regionsCompared >= 3)
        #expect(summary.bytesReceived > 0)
    }

    @Test(arguments: [TrackerKind.async, TrackerKind.sync])
    func imageEqualsTheStoppedSourceUnderWriteLoad(tracker: TrackerKind) async throws {
        try await migrate(tracker: tracker, name: "load-\(tracker.rawValue)")
    }

    /// Writers as fast as they go over all of the memory: pre-copy cannot
    /// converge, so the default policy must stop re-sending by one of its
    /// cost bounds (not the deadline), and the image must still be exact.
    @Test(arguments: [TrackerKind.async, TrackerKind.sync])
    func theDefaultPolicyBoundsANonConvergingWorkload(tracker: TrackerKind) async throws {
        let child = try Memwriter(["--mib", "32", "--threads", "2", "--rate", "0", "--churn", "--pattern"])
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid, tracker: tracker)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory("nonconverging-\(tracker.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        // Only the cost rules may fire: the share rule is out of reach, the deadline far.
        options.policy = FinalizePolicy(cleanShare: 1, maxWaitSeconds: 60)
        let reasons = Mutex<[FinalizeReason]>([])
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options) { event in
            if case .finalizing(let reason) = event { reasons.withLock { $0.append(reason) } }
        }
        let summary = try await leecher.run()
        let reason = try #require(reasons.withLock { $0.first })
        #expect(reason.limit != .maxWait && reason.limit != .cleanShare, "\(reason)")
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
        // Pre-copy stops by 1.5x the memory; post-copy moves at most the memory once more.
        let memory = Double(report.bytesCompared)
        #expect(Double(summary.bytesReceived) <= 2.6 * memory, "moved \(summary.bytesReceived) bytes of \(Int(memory)); \(reason)")
    }

    @Test(arguments: ["stack-heap-first", "cold-first", "profile"])
    func everyHeuristicProducesTheSameImage(heuristic: String) async throws {
        try await migrate(tracker: nil, heuristic: heuristic, name: "heuristic-\(heuristic)")
    }

    @Test func purePostCopyAtZeroPercent() async throws {
        try await migrate(tracker: nil, finalizeAt: 0, name: "postcopy")
    }

    @Test func fullPreCopyAtOneHundredPercent() async throws {
        try await migrate(tracker: nil, finalizeAt: 1, name: "precopy")
    }

    @Test func aSecondLeecherIsRefusedClearly() async throws {
        let child = try Memwriter(["--mib", "8"])
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let first = RPCClient(transport: try await seeder.connector()())
        _ = try TrackReply.decode(try await first.call(MigrationMethod.track.rawValue, TrackRequest().encode()))
        let second = RPCClient(transport: try await seeder.connector()())
        await #expect {
            _ = try await second.call(MigrationMethod.track.rawValue, TrackRequest().encode())
        } throws: { error in
            "\(error)".contains("pid \(child.pid) is already being migrated")
        }
        _ = try await first.call(MigrationMethod.abort.rawValue, [])
        first.close()
        second.close()
    }

    @Test func anAbortedMigrationLeavesTheProcessRunningAndNoImage() async throws {
        let child = try Memwriter(["--mib", "16", "--threads", "2", "--rate", "5000"])
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid)
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let out = scratchDirectory("dryrun")
        var options = LeecherOptions()
        options.abortAtEnd = true
        let leecher = Leecher(connect: seeder.connector(), sink: try ImageWriter(directory: out), options: options)
        _ = try await leecher.run()
        guard case .aborted = await seeder.service.outcome() else {
            Issue.record("the seeder did not report an abort")
            return
        }
        // The process runs on: its write counter moves.
        child.send("count")
        let before = try child.expect("count")
        try await Task.sleep(for: .milliseconds(200))
        child.send("count")
        let after = try child.expect("count")
        #expect(before != after)
        try? FileManager.default.removeItem(atPath: out)
    }
}

/// A source that hands out one wrong page while the process runs: what a
/// bug or a flipped bit on the way would look like. The frozen source is
/// read truthfully, so the checksums must catch it.
final class CorruptingSource: ForwardingSource, @unchecked Sendable {
    // @unchecked: `corrupted` is only touched under the seeder's session lock,
    // which serializes every call into a MemorySource.
    let victim: UInt64
    var corrupted = false

    init(_ inner: TrackedProcess, victim: UInt64) {
        self.victim = victim
        super.init(inner)
    }

    override func readPages(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        let vanished = try inner.readPages(ranges, into: buffer)
        guard !inner.isFrozen, !corrupted else { return vanished }
        var offset = 0
        for range in ranges {
            if range.contains(victim) {
                buffer[offset + Int(victim - range.start)] ^= 0xFF
                corrupted = true
            }
            offset += Int(range.length)
        }
        return vanished
    }
}

@Suite(.serialized) struct VerificationTests {
    @Test func aWrongPageIsCaughtAndTheSourceRunsOn() async throws {
        let child = try Memwriter(["--mib", "8", "--pattern", "--no-write"])
        defer { child.stop() }
        let main = try #require(child.regions["main"])
        let source = CorruptingSource(try TrackedProcess.attach(pid: child.pid), victim: main.start + 5 * pageSize)
        let service = SeederService(source: source, options: SeederOptions(then: .stop, grace: .seconds(3)))
        let server = try await LoopbackServer(secret: try PreSharedSecret.generate()) { await service.serve($0) }
        defer { server.close() }
        let out = scratchDirectory("corrupt")
        let leecher = Leecher(connect: server.connector(), sink: try ImageWriter(directory: out))
        await #expect {
            _ = try await leecher.run()
        } throws: { error in
            "\(error)".contains("does not match the frozen source")
        }
        #expect(source.corrupted)
        guard case .aborted = await service.outcome() else {
            Issue.record("the seeder did not abort")
            return
        }
        #expect(!FileManager.default.fileExists(atPath: out))
        child.send("count")
        _ = try child.expect("count", timeout: 5)  // it answers: thawed, not stopped
    }
}

@Suite(.serialized) struct CompanionConnectionTests {
    @Test func aCompanionMayOnlyReadAndOnlyForItsSession() async throws {
        let child = try Memwriter(["--mib", "4", "--pattern", "--no-write"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        let owner = RPCClient(transport: try await seeder.connector()())
        defer { owner.close() }
        let track = try TrackReply.decode(try await owner.call(MigrationMethod.track.rawValue, TrackRequest().encode()))

        let stranger = RPCClient(transport: try await seeder.connector()())
        defer { stranger.close() }
        await #expect {
            _ = try await stranger.call(MigrationMethod.track.rawValue,
                                        TrackRequest(resume: Array(repeating: 7, count: 16), companion: true).encode())
        } throws: { "\($0)".contains("no running migration") }

        let companion = RPCClient(transport: try await seeder.connector()())
        defer { companion.close() }
        _ = try await companion.call(MigrationMethod.track.rawValue,
                                     TrackRequest(resume: track.session, companion: true).encode())
        let main = try #require(child.regions["main"])
        let page = AddressRange(start: main.start, end: main.start + pageSize)
        let parts = try await companion.call(MigrationMethod.readAt.rawValue, ReadRequest(ranges: [page]).encode())
        #expect(try PagePart.parse(parts).first?.range == page)
        await #expect {
            _ = try await companion.call(MigrationMethod.finalize.rawValue, [])
        } throws: { "\($0)".contains("may only ReadAt") }
        // The owner keeps the session: the companion took nothing from it.
        var w = WireWriter()
        w.u64(track.layoutEpoch)
        _ = try await owner.call(MigrationMethod.sync.rawValue, w.bytes)
        _ = try await owner.call(MigrationMethod.abort.rawValue, [])
    }
}
