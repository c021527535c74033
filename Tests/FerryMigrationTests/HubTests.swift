// The star hub: several leechers pull one live process through a hub; every
// image equals the stopped source, and the seeder sends each page once per
// dirty round however many leechers there are.
import Foundation
import Synchronization
import Testing
import FerryTestSupport
@testable import FerryMigration

/// A hub on an ephemeral loopback port, for one test.
final class LoopbackHub: Sendable {
    let hub: HubService
    let server: LoopbackServer

    init(options: HubOptions, tamper: HubTamper? = nil, secret: PreSharedSecret, log: HubEventLog? = nil) async throws {
        let hub = HubService(options: options, testHooks: tamper?.hooks ?? HubTestHooks()) { event in log?.record(event) }
        self.hub = hub
        server = try await LoopbackServer(secret: secret) { await hub.serve($0) }
    }

    func connector() -> Leecher.Connector { server.connector() }
    func close() { server.close() }
}

/// How a test hub lies, to show what leechers catch: injected into the
/// hub as test hooks.
struct HubTamper: Sendable {
    /// Flips the first byte of this page in every ReadAt reply.
    var alterPage: UInt64? = nil
    /// Answers Checksum with unsigned digests of what the hub serves,
    /// instead of forwarding the seeder's answer.
    var forgeChecksums = false

    var hooks: HubTestHooks {
        var hooks = HubTestHooks()
        let altered = alterPage
        if let altered {
            hooks.beforeSendingPart = { chunk, cached, buffer in
                guard cached.contains(altered), let i = chunk.firstIndex(of: altered) else { return }
                buffer[i * Int(pageSize)] ^= 0xFF
            }
        }
        if forgeChecksums {
            hooks.answerChecksum = { ranges, read in try Self.forgedChecksums(ranges, read: read, altered: altered) }
        }
        return hooks
    }

    /// Digests of what the hub serves, unsigned, as a hub posing as the
    /// source would answer.
    static func forgedChecksums(_ ranges: [AddressRange], read: HubTestHooks.PageReader, altered: UInt64?) throws -> ChecksumReply {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(pageSize), alignment: Int(pageSize))
        defer { buffer.deallocate() }
        var digests: [[UInt8]] = []
        for range in ranges {
            var hasher = Blake2b256()
            for page in stride(from: range.start, to: range.end, by: Int(pageSize)) {
                if try !read(page, buffer.baseAddress!) { buffer.initializeMemory(as: UInt8.self, repeating: 0) }
                if altered == page { buffer[0] ^= 0xFF }
                hasher.update(UnsafeRawBufferPointer(buffer))
            }
            digests.append(hasher.finish())
        }
        return ChecksumReply(digests: digests)
    }
}

/// A hub's events, kept for assertions.
final class HubEventLog: Sendable {
    private let events = Mutex<[HubEvent]>([])
    func record(_ event: HubEvent) { events.withLock { $0.append(event) } }

    var finalized: Bool {
        events.withLock { $0.contains { if case .finalized = $0 { return true } else { return false } } }
    }

    /// The most leechers seen ready at once while the hub waited to finalize.
    var mostReady: Int {
        events.withLock { $0.reduce(0) { if case .waitingToFinalize(let ready, _) = $1 { return max($0, ready) } else { return $0 } } }
    }

    func waitFor(_ condition: @Sendable (HubEventLog) -> Bool, limit: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + limit
        while !condition(self) {
            guard ContinuousClock.now < deadline else { throw TestFailure("the hub did not get there within \(limit)") }
            try await Task.sleep(for: .milliseconds(10))
        }
    }
}

/// An upstream connector that can be cut: open connections are closed and
/// new ones refused, as when the seeder's host drops off the network. The
/// refusal is final (an RPC error, not a link failure), so the hub gives up
/// at once instead of retrying for the seeder's grace period.
final class CuttableConnector: Sendable {
    private let inner: SessionLink.Connector
    private let state = Mutex<(cut: Bool, open: [FrameTransport])>((false, []))

    init(_ inner: @escaping SessionLink.Connector) { self.inner = inner }

    func connector() -> SessionLink.Connector {
        { [self] in
            if state.withLock({ $0.cut }) { throw RPCError(code: .unavailable, message: "test: the upstream is cut") }
            let transport = try await inner()
            state.withLock { $0.open.append(transport) }
            return transport
        }
    }

    func cut() {
        for transport in state.withLock({ s -> [FrameTransport] in s.cut = true; return s.open }) { transport.close() }
    }
}

@Suite(.serialized) struct HubTests {
    func pullThrough(_ hub: LoopbackHub, name: String, delays: [Int], verify: Bool = true) async throws -> [String] {
        try await withThrowingTaskGroup(of: String.self) { group in
            for (index, delay) in delays.enumerated() {
                group.addTask {
                    try await Task.sleep(for: .milliseconds(delay))
                    let out = scratchDirectory("\(name)-\(index)")
                    var options = LeecherOptions()
                    options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
                    options.verify = verify
                    let leecher = Leecher(connect: hub.connector(), sink: try ImageWriter(directory: out), options: options)
                    _ = try await leecher.run()
                    return out
                }
            }
            var outs: [String] = []
            for try await out in group { outs.append(out) }
            return outs
        }
    }

    @Test func threeLeechersStartedAtDifferentTimesGetTheSameImage() async throws {
        let child = try Memwriter(["--mib", "24", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        var options = HubOptions()
        options.finalize = .whenAllReady
        let hub = try await LoopbackHub(options: options, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let outs = try await pullThrough(hub, name: "hub3", delays: [0, 50, 100])
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        #expect(await seeder.service.outcome() == .completed("pid \(child.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"))
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }

    /// A process whose memory changes shape under write load (churn, heap
    /// growth, zapped pages, shared and memfd regions), through a hub to one
    /// and to four leechers: every image equals the stopped source.
    @Test(arguments: [1, 4])
    func aShapeChangingProcessUnderLoadMigratesThroughTheHub(leechers: Int) async throws {
        let child = try Memwriter(EndToEndTests.busyWorkload)
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        let hub = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let outs = try await pullThrough(hub, name: "hubshape\(leechers)", delays: Array(repeating: 0, count: leechers))
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        #expect(await seeder.service.outcome() == .completed("pid \(child.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"))
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }

    @Test func theSeederSendsEachPageOnceForManyLeechers() async throws {
        let child = try Memwriter(["--mib", "16", "--pattern", "--no-write"])
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid)
        let pages = process.regions.filter { $0.kind == .migrate }.reduce(0) { $0 + $1.range.pageCount }
        let seeder = try await LoopbackSeeder(process: process)
        defer { seeder.close() }
        let hub = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let outs = try await pullThrough(hub, name: "hub-once", delays: [0, 0, 0, 0])
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        _ = await seeder.service.outcome()
        // An idle source: one round, so every page once (a few pages of the
        // child's own stack and stdio may be written meanwhile).
        #expect(seeder.service.pagesSent <= pages + pages / 20, "sent \(seeder.service.pagesSent) of \(pages) pages")
        for out in outs {
            #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
        }
    }

    @Test func aSeederDialingOutMeetsLeechersAtTheHub() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000"])
        defer { child.stop() }
        let secret = try PreSharedSecret.generate()
        let hub = try await LoopbackHub(options: HubOptions(), secret: secret)
        defer { hub.close() }
        // The hub's seeder side: accepts the seeder's call.
        let seeders = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        defer { seeders.close() }
        let hubService = hub.hub
        Task {
            while let transport = try? await seeders.accept() {
                let channel = try await SecureChannel.server(over: transport, credentials: .preSharedSecret(secret))
                try await hubService.acceptSeeder(channel)
            }
        }
        let service = SeederService(source: try TrackedProcess.attach(pid: child.pid),
                                    options: SeederOptions(migration: "db"))
        let seedersEndpoint = seeders.endpoint
        let dialing = Task {
            await service.dialOut(connect: {
                let transport = try await Transports.connect(to: seedersEndpoint)
                return try await SecureChannel.client(over: transport, credentials: .preSharedSecret(secret))
            })
        }
        defer { dialing.cancel() }
        while hub.hub.migrationNames.isEmpty { try await Task.sleep(for: .milliseconds(20)) }
        #expect(hub.hub.migrationNames == ["db"])
        let out = scratchDirectory("via")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let leecher = Leecher(connect: hub.connector(), sink: try ImageWriter(directory: out), migration: "db")
        _ = try await leecher.run()
        _ = await service.outcome()
        #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
    }

    @Test func aChainOfTwoHubs() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000", "--pattern"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        let near = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { near.close() }
        try await near.hub.addUpstream(connect: seeder.connector())
        let far = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { far.close() }
        try await far.hub.addUpstream(connect: near.connector())
        let outs = try await pullThrough(far, name: "chain", delays: [0, 30])
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        _ = await seeder.service.outcome()
        for out in outs {
            #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
        }
    }

    @Test func leechersFailCleanlyWhenTheUpstreamIsLostBeforeFinalize() async throws {
        let child = try Memwriter(["--mib", "16", "--threads", "1", "--rate", "2000"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), grace: .seconds(1))
        var hubOptions = HubOptions()
        hubOptions.finalize = .manual
        let hub = try await LoopbackHub(options: hubOptions, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let out = scratchDirectory("lost-upstream")
        let leecher = Leecher(connect: hub.connector(), sink: try ImageWriter(directory: out))
        let run = Task { try await leecher.run() }
        try await Task.sleep(for: .milliseconds(300))
        // The seeder goes away: its listener closes and its process is let go.
        seeder.close()
        seeder.service.abandon("test: seeder stopped")
        await #expect(throws: (any Error).self) { _ = try await run.value }
        #expect(!FileManager.default.fileExists(atPath: out))
    }

    @Test func aLeecherKilledMidTransferDoesNotDisturbTheOthers() async throws {
        let child = try Memwriter(["--mib", "24", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        var options = HubOptions()
        options.grace = .seconds(1)
        let hub = try await LoopbackHub(options: options, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        // The victim tracks and reads part of the image, then its connection
        // ends without Abort or Complete, as when its process is killed.
        let victim = RPCClient(transport: try await hub.connector()())
        let reply = try TrackReply.decode(try await victim.call(MigrationMethod.track.rawValue, TrackRequest().encode()))
        let region = try #require(reply.layout.first { $0.kind == .migrate && $0.range.pageCount >= 256 })
        let read = ReadRequest(ranges: [AddressRange(start: region.start, end: region.start + 256 * pageSize)])
        for try await _ in victim.callStreaming(MigrationMethod.readAt.rawValue, read.encode()) {}
        let others = Task { try await pullThrough(hub, name: "hub-killed", delays: [0, 50]) }
        try await Task.sleep(for: .milliseconds(100))
        victim.close()
        let outs = try await others.value
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        #expect(await seeder.service.outcome() == .completed("pid \(child.pid) is stopped and detached; kill it or resume it (kill -CONT) by hand"))
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }

    @Test func afterFinalizeTheHubServesFromItsCacheWithoutTheUpstream() async throws {
        let child = try Memwriter(["--mib", "16", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        // The seeder waits for the lost hub longer than the test runs, so the
        // source stays frozen while the images are compared with it; it is
        // let go (thawed) before the process is killed.
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), grace: .seconds(60))
        defer { seeder.close() }
        defer { seeder.service.abandon("test over") }
        var options = HubOptions()
        options.finalize = .first
        let hub = try await LoopbackHub(options: options, secret: seeder.secret)
        defer { hub.close() }
        let upstream = CuttableConnector(seeder.connector())
        let name = try await hub.hub.addUpstream(connect: upstream.connector())
        let first = Task { try await pullThrough(hub, name: "hub-after-first", delays: [0]) }
        #expect(await hub.hub.waitUntilFilled(name))
        upstream.cut()
        var outs = try await first.value
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        // Leechers joining now are served from the frozen state in the cache.
        outs += try await pullThrough(hub, name: "hub-after-late", delays: [0, 20])
        #expect(outs.count == 3)
        // The seeder never heard of them: it still waits for the hub, with the source frozen.
        #expect(!seeder.service.isFinished)
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }

    @Test func finalizeFirstFreezesForTheFirstAndServesALateJoinerFromTheFrozenState() async throws {
        let child = try Memwriter(["--mib", "16", "--threads", "2", "--rate", "5000", "--pattern"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        var options = HubOptions()
        options.finalize = .first
        let log = HubEventLog()
        let hub = try await LoopbackHub(options: options, secret: seeder.secret, log: log)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let first = Task { try await pullThrough(hub, name: "hub-first-a", delays: [0]) }
        try await log.waitFor { $0.finalized }
        let late = try await pullThrough(hub, name: "hub-first-b", delays: [0])
        let outs = try await first.value + late
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        _ = await seeder.service.outcome()
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }

    @Test func finalizeManualWaitsForTheOperator() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000", "--pattern"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        var options = HubOptions()
        options.finalize = .manual
        let log = HubEventLog()
        let hub = try await LoopbackHub(options: options, secret: seeder.secret, log: log)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let pulling = Task { try await pullThrough(hub, name: "hub-manual", delays: [0, 30]) }
        // Both leechers asked to finalize; the source keeps running until the operator says so.
        try await log.waitFor { $0.mostReady == 2 }
        try await Task.sleep(for: .milliseconds(300))
        #expect(!log.finalized)
        #expect(!seeder.service.isFinished)
        hub.hub.finalizeNow()
        let outs = try await pulling.value
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        #expect(log.finalized)
        _ = await seeder.service.outcome()
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
        }
    }

    @Test func whenEveryLeecherLeavesAfterTheFreezeTheSourceIsThawed() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "2000"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        let log = HubEventLog()
        let hub = try await LoopbackHub(options: HubOptions(), secret: seeder.secret, log: log)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        // A dry run through the hub: the only leecher finalizes, then aborts.
        var options = LeecherOptions()
        options.abortAtEnd = true
        let out = scratchDirectory("hub-abandon")
        defer { try? FileManager.default.removeItem(atPath: out) }
        _ = try await Leecher(connect: hub.connector(), sink: try ImageWriter(directory: out), options: options).run()
        guard case .aborted = await seeder.service.outcome() else {
            Issue.record("the seeder was not told to abort")
            return
        }
        #expect(log.finalized)
        // The source runs on, and the hub turns new leechers away.
        child.send("count")
        let before = try child.expect("count")
        try await Task.sleep(for: .milliseconds(200))
        child.send("count")
        #expect(try child.expect("count") != before)
        let late = RPCClient(transport: try await hub.connector()())
        defer { late.close() }
        await #expect {
            _ = try await late.call(MigrationMethod.track.rawValue, TrackRequest().encode())
        } throws: { "\($0)".contains("was abandoned") }
    }
}

extension HubTests {
    /// Huge pages through a hub to two leechers: the layout's page size
    /// travels through, and every image equals the stopped source.
    @Test func hugetlbMemoryUnderWritesMigratesThroughTheHub() async throws {
        let pool = HugePagePool(pages: 12)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let child = try Hugemem(["--private", "4", "--shm", "2", "--memfd", "2", "--pause-us", "50"])
        defer { child.stop() }
        try #require(child.refused == nil, "\(child.refused ?? "")")
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        let hub = try await LoopbackHub(options: HubOptions(), secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let outs = try await pullThrough(hub, name: "hubhuge", delays: [0, 0])
        defer { for out in outs { try? FileManager.default.removeItem(atPath: out) } }
        for out in outs {
            let report = try ImageVerifier.compare(directory: out, pid: child.pid)
            #expect(report.matches, "\(out): \(report)")
            let manifest = try Manifest.load(directory: out)
            #expect(manifest.regions.filter { $0.pageSize == 2 << 20 }.count == 3, "\(out)")
        }
    }
}
