// Whole migrations on this machine: a real multi-threaded workload under
// write load with mapping churn, a real seeder tracking it over real TCP on
// 127.0.0.1 with the secure channel, and a leecher writing an image. After
// Complete (the source is left stopped) the image must equal the source's
// memory byte for byte, region for region.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

/// A seeder service on an ephemeral loopback port, for one test.
final class LoopbackSeeder: Sendable {
    let service: SeederService
    let listener: Listener
    let secret: PreSharedSecret
    let acceptTask: Task<Void, Never>

    init(process: TrackedProcess, then: ThenAction = .stop, grace: Duration = .seconds(3),
         signingKey: KeyPair? = nil) async throws {
        var options = SeederOptions(then: then, grace: grace)
        options.signingKey = signingKey
        service = SeederService(source: process, options: options)
        listener = try await Listener.bind(.tcp(host: "127.0.0.1", port: 0))
        secret = try PreSharedSecret.generate()
        let (listener, secret, service) = (listener, secret, service)
        acceptTask = Task {
            while let transport = try? await listener.accept() {
                Task {
                    guard let channel = try? await SecureChannel.server(over: transport,
                                                                        credentials: .preSharedSecret(secret)) else {
                        transport.close()
                        return
                    }
                    await service.serve(channel)
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
        options.heuristic = try HeuristicName.make(heuristic)
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

    @Test(arguments: ["stack-heap-first", "cold-first"])
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
