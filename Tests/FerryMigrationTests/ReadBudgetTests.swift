// A peer that asks for many pages and reads none of the answers must not
// make the seeder or the hub hold memory without bound: each connection's
// ReadAt requests share a budget taken before any page is read.
import Foundation
import Testing
import Synchronization
import FerryTestSupport
@testable import FerryWire
@testable import FerryMigration

/// Counts the pages read from the process.
final class CountingSource: ForwardingSource, @unchecked Sendable {
    // Invariant: `pagesRead` is atomic.
    let pagesRead = Atomic<Int>(0)
    override func readPages(_ ranges: [AddressRange], into buffer: UnsafeMutableRawBufferPointer) throws -> [AddressRange] {
        pagesRead.add(ranges.reduce(0) { $0 + Int($1.pageCount) }, ordering: .relaxed)
        return try inner.readPages(ranges, into: buffer)
    }
}

final class Arrivals: Sendable {
    let list = Mutex<[Int]>([])
}

@Suite(.serialized) struct ByteBudgetTests {
    @Test func waitersAreServedInOrderAndCancellationLetsGo() async throws {
        let budget = ByteBudget(bytes: 10)
        try await budget.acquire(8)
        let order = Arrivals()
        let second = Task { try await budget.acquire(5); order.list.withLock { $0.append(2) } }
        try await Task.sleep(for: .milliseconds(20))
        let third = Task { try await budget.acquire(2); order.list.withLock { $0.append(3) } }
        try await Task.sleep(for: .milliseconds(20))
        // 2 bytes are free, but the third waits behind the second: first come, first served.
        #expect(order.list.withLock { $0 }.isEmpty)
        budget.release(8)
        try await second.value
        try await third.value
        #expect(order.list.withLock { $0 } == [2, 3])
        #expect(budget.inUse == 7)
        let cancelled = Task { try await budget.acquire(10) }
        try await Task.sleep(for: .milliseconds(20))
        cancelled.cancel()
        await #expect(throws: CancellationError.self) { try await cancelled.value }
        budget.release(7)
        #expect(budget.inUse == 0)
    }

    @Test func unreadReadAtRepliesPinABoundedAmountOfMemory() async throws {
        let child = try Memwriter(["--mib", "160", "--pattern", "--no-write"])
        defer { child.stop() }
        let main = try #require(child.regions["main"])
        let source = CountingSource(try TrackedProcess.attach(pid: child.pid))
        let service = SeederService(source: source, options: SeederOptions(then: .resume, grace: .seconds(1)))
        let (peer, seederEnd) = InMemoryTransport.pair(capacityFrames: 4, capacityBytes: 1 << 20,
                                                       names: ("peer-that-stops-reading", "seeder"))
        let serving = Task { await service.serve(seederEnd) }
        try await peer.send(RPCMessage.frame(.request, id: 1, code: MigrationMethod.track.rawValue,
                                             payload: TrackRequest().encode()))
        _ = try await peer.receive()
        // 128 requests of 1 MiB each; none of the answers is read.
        let pages = MigrationLimits.pagesPerPart
        for i in 0..<128 {
            let start = main.start + UInt64(i * pages) * pageSize
            let request = ReadRequest(ranges: [AddressRange(start: start, end: start + UInt64(pages) * pageSize)])
            try await peer.send(RPCMessage.frame(.request, id: UInt32(100 + i), code: MigrationMethod.readAt.rawValue,
                                                 payload: request.encode()))
        }
        try await Task.sleep(for: .seconds(1))
        let read = source.pagesRead.load(ordering: .relaxed) * Int(pageSize)
        // Everything read is held: in the RPC send queue (16 MiB), the
        // transport (1 MiB here), or by a reading request (2 MiB each, 24 at
        // once). At most 64 MiB, never the 128 MiB asked.
        #expect(read > 0)
        #expect(read <= (64 << 20) + (1 << 20), "\(read >> 20) MiB read for a peer that reads nothing")
        peer.close()
        await serving.value
    }
}

/// ReadAt and Checksum serve only the migration's memory: the program's code,
/// `[vdso]` and anything outside the layout's migratable regions is never read.
@Suite(.serialized) struct ServedMemoryTests {
    @Test func codeAndVdsoAreNeverReadNorHashed() async throws {
        let child = try Memwriter(["--mib", "4", "--pattern", "--no-write"])
        defer { child.stop() }
        let process = try TrackedProcess.attach(pid: child.pid)
        let code = try #require(process.regions.first { $0.permissions.contains("x") && $0.kind != .migrate })
        let source = CountingSource(process)
        let service = SeederService(source: source, options: SeederOptions(then: .resume, grace: .seconds(1)))
        let (leecherEnd, seederEnd) = InMemoryTransport.pair(names: ("leecher", "seeder"))
        let serving = Task { await service.serve(seederEnd) }
        let link = SessionLink(connect: { leecherEnd })
        _ = try await link.open()
        let codePage = AddressRange(start: code.start, end: code.start + pageSize)
        let parts = try await link.callParts(.readAt, ReadRequest(ranges: [codePage]).encode())
        let runs = try parts.filter { !$0.isEmpty }.flatMap { try PagePart.parse($0) }
        #expect(runs.map(\.kind) == [.unmapped], "\(code.name) at \(code.range) was served")
        #expect(source.pagesRead.load(ordering: .relaxed) == 0)
        _ = try await link.callParts(.finalize, [])
        var request = WireWriter()
        request.ranges([codePage])
        await #expect {
            _ = try await link.call(.checksum, request.bytes)
        } throws: { error in
            "\(error)".contains("is not migrated memory of pid \(child.pid)")
        }
        _ = try await link.call(.abort, [])
        await link.close()
        await serving.value
    }
}
