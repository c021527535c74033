// Under a bandwidth cap, a post-copy touch (a ReadAt on the companion
// connection) is answered at once while bulk ReadAt parts wait for the cap;
// its bytes are still counted. A hub's cap paces what it sends its leechers.
import Foundation
import Testing
import FerryTestSupport
@testable import FerryMigration

@Suite(.serialized) struct BandwidthPriorityTests {
    @Test func aTouchOnTheCompanionIsNotHeldBackBehindBulkPagesTheCapDelays() async throws {
        let child = try Memwriter(["--mib", "8", "--pattern", "--no-write"])
        defer { child.stop() }
        // 4 MiB of bulk at 100 kB/s: about 40 s, far longer than the test.
        let pacer = Pacer(rate: try BandwidthRate(parsing: "100K"))
        var options = SeederOptions(then: .resume, grace: .seconds(1))
        options.pacer = pacer
        let service = SeederService(source: try TrackedProcess.attach(pid: child.pid), options: options)
        let server = try await LoopbackServer(secret: try PreSharedSecret.generate()) { await service.serve($0) }
        defer { server.close() }
        let owner = RPCClient(transport: try await server.connector()())
        let track = try TrackReply.decode(try await owner.call(MigrationMethod.track.rawValue, TrackRequest().encode()))
        let main = try #require(child.regions["main"])
        let bulkRange = AddressRange(start: main.start, end: main.start + 1024 * pageSize)
        let bulkPayload = ReadRequest(ranges: [bulkRange]).encode()
        let bulk = Task { try await owner.call(MigrationMethod.readAt.rawValue, bulkPayload) }
        // Let the bulk request spend the burst and start waiting.
        try await Task.sleep(for: .milliseconds(300))

        let companion = RPCClient(transport: try await server.connector()())
        defer { companion.close() }
        _ = try await companion.call(MigrationMethod.track.rawValue,
                                     TrackRequest(resume: track.session, companion: true).encode())
        let page = AddressRange(start: main.start + 2000 * pageSize, end: main.start + 2001 * pageSize)
        let began = ContinuousClock.now
        let parts = try await companion.call(MigrationMethod.readAt.rawValue, ReadRequest(ranges: [page]).encode())
        let took = ContinuousClock.now - began
        #expect(try PagePart.parse(parts).first?.range == page)
        // At the cap a 4 KiB page behind the bulk bytes would wait ~40 s.
        #expect(took < .seconds(2), "\(took)")
        #expect(pacer.bytesCounted.urgent >= UInt64(pageSize))
        #expect(!bulk.isCancelled)
        owner.close()
        _ = await bulk.result
    }

    @Test func aHubCapsWhatItSendsAndTheImageIsByteExact() async throws {
        let child = try Memwriter(["--mib", "8", "--threads", "1", "--rate", "500", "--pattern"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid))
        defer { seeder.close() }
        var options = HubOptions()
        let cap = 4e6
        options.pacer = Pacer(rate: try BandwidthRate(bytesPerSecond: cap))
        let hub = try await LoopbackHub(options: options, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let out = scratchDirectory("bw-hub")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let summary = try await Leecher(connect: hub.connector(), sink: try ImageWriter(directory: out)).run()
        #expect(summary.bytesReceived >= 8 << 20)
        // The first burst (256 KiB at this cap; 1 MiB allowed for) goes at once, the rest at the cap.
        #expect(summary.seconds >= (Double(summary.bytesReceived) - 1048576) / cap, "\(summary.seconds) s")
        #expect(options.pacer!.bytesCounted.bulk >= summary.bytesReceived)
        _ = await seeder.service.outcome()
        #expect(try ImageVerifier.compare(directory: out, pid: child.pid).matches)
    }

    @Test func aTouchThroughACappedHubIsNotHeldBackEither() async throws {
        let child = try Memwriter(["--mib", "8", "--pattern", "--no-write"])
        defer { child.stop() }
        let seeder = try await LoopbackSeeder(process: try TrackedProcess.attach(pid: child.pid), then: .resume)
        defer { seeder.close() }
        var options = HubOptions()
        options.pacer = Pacer(rate: try BandwidthRate(parsing: "100K"))
        let hub = try await LoopbackHub(options: options, secret: seeder.secret)
        defer { hub.close() }
        try await hub.hub.addUpstream(connect: seeder.connector())
        let owner = RPCClient(transport: try await hub.connector()())
        let track = try TrackReply.decode(try await owner.call(MigrationMethod.track.rawValue, TrackRequest().encode()))
        let main = try #require(child.regions["main"])
        let bulkPayload = ReadRequest(ranges: [AddressRange(start: main.start, end: main.start + 1024 * pageSize)]).encode()
        let bulk = Task { try await owner.call(MigrationMethod.readAt.rawValue, bulkPayload) }
        try await Task.sleep(for: .milliseconds(500))
        let companion = RPCClient(transport: try await hub.connector()())
        defer { companion.close() }
        _ = try await companion.call(MigrationMethod.track.rawValue,
                                     TrackRequest(resume: track.session, companion: true).encode())
        let page = AddressRange(start: main.start + 2000 * pageSize, end: main.start + 2001 * pageSize)
        let began = ContinuousClock.now
        let parts = try await companion.call(MigrationMethod.readAt.rawValue, ReadRequest(ranges: [page]).encode())
        let took = ContinuousClock.now - began
        #expect(try PagePart.parse(parts).first?.range == page)
        #expect(took < .seconds(3), "\(took)")
        #expect(options.pacer!.bytesCounted.urgent >= UInt64(pageSize))
        owner.close()
        _ = await bulk.result
    }
}
