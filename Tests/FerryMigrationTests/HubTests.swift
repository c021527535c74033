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

    init(options: HubOptions, secret: PreSharedSecret) async throws {
        let hub = HubService(options: options)
        self.hub = hub
        server = try await LoopbackServer(secret: secret) { await hub.serve($0) }
    }

    func connector() -> Leecher.Connector { server.connector() }
    func close() { server.close() }
}

@Suite(.serialized) struct HubTests {
    func pullThrough(_ hub: LoopbackHub, name: String, delays: [Int]) async throws -> [String] {
        try await withThrowingTaskGroup(of: String.self) { group in
            for (index, delay) in delays.enumerated() {
                group.addTask {
                    try await Task.sleep(for: .milliseconds(delay))
                    let out = scratchDirectory("\(name)-\(index)")
                    var options = LeecherOptions()
                    options.policy = FinalizePolicy(cleanShare: 0.95, maxWaitSeconds: 10)
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
}
