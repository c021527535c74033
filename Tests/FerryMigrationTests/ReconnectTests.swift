// A dropped connection is not a failed migration: the leecher reconnects
// through a relay that cut it, resumes the session, and the image still
// equals the stopped source byte for byte. Cuts before and after the freeze.
import Foundation
import Synchronization
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct ReconnectTests {
    enum CutPoint: String, CaseIterable { case beforeFreeze, afterFreeze }

    @Test(arguments: CutPoint.allCases)
    func migrationSurvivesACut(at point: CutPoint) async throws {
        let child = try Memwriter(["--mib", "48", "--threads", "2", "--rate", "20000", "--churn", "--pattern"])
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid)
        let seeder = try await LoopbackSeeder(process: process, grace: .seconds(10))
        defer { seeder.close() }
        guard case .tcp(_, let seederPort) = seeder.listener.endpoint else { throw TestFailure("no port") }
        let relay = try Relay(to: "127.0.0.1:\(seederPort)")
        defer { relay.stop() }
        let secret = seeder.secret
        let viaRelay: Leecher.Connector = {
            let transport = try await Transports.connect(to: .tcp(host: "127.0.0.1", port: relay.port))
            return try await SecureChannel.client(over: transport, credentials: .preSharedSecret(secret))
        }
        let out = scratchDirectory("cut-\(point.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        var options = LeecherOptions()
        options.policy = FinalizePolicy(cleanShare: 0.9, maxWaitSeconds: 10)
        // Small requests, so the transfer takes long enough to be cut in the middle.
        options.pagesPerRequest = 16
        options.requestsInFlight = 4
        let cuts = Atomic<Int>(0)
        let resumed = Atomic<Int>(0)
        let leecher = Leecher(connect: viaRelay, sink: try ImageWriter(directory: out), options: options) { event in
            switch (point, event) {
            case (.beforeFreeze, .progress(let p)) where p.pagesClean > p.pagesTotal / 3:
                if cuts.compareExchange(expected: 0, desired: 1, ordering: .relaxed).exchanged { relay.drop() }
            case (.afterFreeze, .finalized):
                if cuts.compareExchange(expected: 0, desired: 1, ordering: .relaxed).exchanged { relay.drop() }
            case (_, .resumed):
                resumed.add(1, ordering: .relaxed)
            default:
                break
            }
        }
        _ = try await leecher.run()
        #expect(cuts.load(ordering: .relaxed) == 1)
        #expect(resumed.load(ordering: .relaxed) >= 1)
        // --metrics counts the resume and the lost connection.
        let metrics = seeder.service.metrics
        #expect(metrics.reconnects.load(ordering: .relaxed) >= 1)
        #expect(metrics.errors[MetricsErrorKind.allCases.firstIndex(of: .connectionLost)!].value.load(ordering: .relaxed) >= 1)
        #expect(metrics.connections.load(ordering: .relaxed) >= 2)
        let report = try ImageVerifier.compare(directory: out, pid: child.pid)
        #expect(report.matches, "\(report)")
    }
}
