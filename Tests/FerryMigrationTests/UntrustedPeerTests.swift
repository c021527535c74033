// What a broken or hostile seeder (or hub) sends must not make the leecher
// or the hub allocate or walk without bound: layouts are checked, replies
// are capped, dirty ranges are clamped to the layout.
import Foundation
import Testing
@testable import FerryWire
@testable import FerryMigration
import FerryCLI

private func region(_ start: UInt64, _ end: UInt64) -> Region {
    Region(range: AddressRange(start: start, end: end), permissions: "rw-p", offset: 0, device: "00:00",
           inode: 0, name: "", kind: .migrate)
}

private func decodeLayout(_ layout: [Region]) throws -> [Region] {
    var w = WireWriter()
    w.regions(layout)
    var r = WireReader(w.bytes)
    return try r.regions()
}

@Suite struct UntrustedPeerTests {
    @Test func overlappingUnsortedOrHugeLayoutsAreRefused() throws {
        #expect(try decodeLayout([region(0x1000, 0x3000), region(0x3000, 0x4000)]).count == 2)
        #expect(throws: WireDecodeError("region 0x2000-0x5000 overlaps or precedes 0x1000-0x3000: a layout is sorted and without overlaps")) {
            try decodeLayout([region(0x1000, 0x3000), region(0x2000, 0x5000)])
        }
        #expect(throws: WireDecodeError.self) { try decodeLayout([region(0x9000, 0xa000), region(0x1000, 0x2000)]) }
        // 2 TiB to migrate: the leecher would need gigabytes of page state.
        #expect(throws: WireDecodeError("the layout has 2048 GiB to migrate, over the limit of 1024 GiB")) {
            try decodeLayout([region(0x1000_0000_0000, 0x1000_0000_0000 + (2 << 40))])
        }
    }

    @Test func aHubRenewsOnlyPagesOfTheLayout() {
        let layout = [region(0x1000, 0x3000), region(0x8000, 0x9000)]
        // One range of 1 TiB from a hostile seeder: 268 million pages to walk.
        let hostile = [AddressRange(start: 0, end: 1 << 40)]
        let renewed = HubMigration.renewed(hostile, layout: layout)
        #expect(renewed == [AddressRange(start: 0x1000, end: 0x3000), AddressRange(start: 0x8000, end: 0x9000)])
        #expect(renewed.reduce(0) { $0 + $1.pageCount } == 3)
        // Ranges that overlap each other or touch the layout's edges.
        let ragged = [AddressRange(start: 0x2000, end: 0x5000), AddressRange(start: 0, end: 0x2000)]
        #expect(HubMigration.renewed(ragged, layout: layout) == [AddressRange(start: 0x1000, end: 0x3000)])
    }

    @Test func aReplyOverTheProtocolsLimitEndsTheCall() async throws {
        let (a, b) = InMemoryTransport.pair(names: ("leecher", "hostile-seeder"))
        let server = RPCServer(transport: b) { method, _, parts in
            if method == MigrationMethod.track.rawValue {
                return TrackReply(session: Array(repeating: 1, count: 16), phase: .tracking, pid: 1, host: "h",
                                  tracker: "async", graceMilliseconds: 1000, layoutEpoch: 1,
                                  layout: [region(0x1000, 0x2000)]).encode()
            }
            // A ReadAt answered with far more than any request may carry.
            for _ in 0..<64 { try await parts.send([UInt8](repeating: 0, count: 1 << 20)) }
            return []
        }
        let serving = Task { try? await server.run() }
        let link = SessionLink(connect: { a })
        _ = try await link.open()
        await #expect {
            _ = try await link.callParts(.readAt, ReadRequest(ranges: [AddressRange(start: 0x1000, end: 0x2000)]).encode())
        } throws: { error in
            "\(error)".contains("sent more than 5 MiB in reply to one readAt")
        }
        a.close()
        serving.cancel()
    }
}

@Suite struct TerminalTextTests {
    @Test func peerTextCannotDriveTheTerminal() {
        // A host name with an escape sequence (clear screen, retitle) and a C1 control.
        #expect(FerryCLI.terminalSafe("evil\u{1b}[2J\u{1b}]0;owned\u{07}host\u{9b}x") == "evil?[2J?]0;owned?host?x")
        #expect(FerryCLI.terminalSafe("plain hôst-01 (ok)") == "plain hôst-01 (ok)")
    }
}
