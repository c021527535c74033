// The pieces of the CRIU integration that need no CRIU (Protocols/criu.md):
// the page-server header, the image bundle and the pagemap reader.
import Foundation
import Testing
@testable import FerryCRIU

struct CriuWireTests {
    @Test func headerLayoutIsCriusStruct() {
        let header = PageServerHeader(command: .addFlagged, flags: PagemapFlag.present, pages: 3, address: 0x7f00_0000_1000,
                                      destination: 1)
        let bytes = header.encoded()
        #expect(bytes.count == 32)
        // cmd = PE_PRESENT << 16 | PS_IOV_ADD_F, little-endian, then 4 bytes of padding.
        #expect(Array(bytes[0..<8]) == [6, 0, 4, 0, 0, 0, 0, 0])
        #expect(Array(bytes[8..<16]) == [3, 0, 0, 0, 0, 0, 0, 0])
        #expect(Array(bytes[16..<24]) == [0x00, 0x10, 0, 0, 0x00, 0x7f, 0, 0])
        let decoded = bytes.withUnsafeBytes { PageServerHeader(decoding: $0) }
        #expect(decoded == header)
        #expect(decoded.known == .addFlagged)
        let close = PageServerHeader(command: .close).encoded()
        #expect(Array(close[0..<4]) == [0x23, 0x10, 0, 0])
    }

    @Test func criu41ReadsTheNarrowHeader() {
        // CRIU 4.1: u32 cmd, u32 nr_pages, u64 vaddr, u64 dst_id; 32 bytes make it fail ("Unexpected data").
        let bytes = PageServerHeader(command: .close, pages: 2, address: 0x1000, destination: 7).encoded(narrow: true)
        #expect(bytes.count == 24)
        #expect(Array(bytes[0..<8]) == [0x23, 0x10, 0, 0, 2, 0, 0, 0])
        #expect(Array(bytes[8..<16]) == [0, 0x10, 0, 0, 0, 0, 0, 0])
        #expect(Array(bytes[16..<24]) == [7, 0, 0, 0, 0, 0, 0, 0])
        #expect(Criu(path: "criu", version: "4.1.1").hasNarrowPageServerHeader)
        #expect(!Criu(path: "criu", version: "4.2").hasNarrowPageServerHeader)
        #expect(!Criu(path: "criu", version: "5.0").hasNarrowPageServerHeader)
    }

    @Test func bundleRoundTripsAndRefusesPaths() throws {
        let directory = "/tmp/ferry-criu-wire-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory + "/in", withIntermediateDirectories: true)
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: directory + "/in/core-1.img"))
        try Data().write(to: URL(fileURLWithPath: directory + "/in/empty.img"))
        try Data([9]).write(to: URL(fileURLWithPath: directory + "/in/dump.log"))
        let bundle = try CriuImages.pack(directory: directory + "/in")
        let names = try CriuImages.unpack(bundle, into: directory + "/out")
        #expect(names == ["core-1.img", "empty.img"])
        #expect(FileManager.default.contents(atPath: directory + "/out/core-1.img") == Data([1, 2, 3]))
        // A name with a slash, a cut bundle, trailing bytes: refused.
        var evil = Array("FCI1".utf8) + [1, 0, 0, 0, 13, 0, 0, 0] + Array("../x/evil.img".utf8) + [0, 0, 0, 0, 0, 0, 0, 0]
        #expect(throws: CriuError.self) { try CriuImages.unpack(evil, into: directory + "/evil") }
        evil = Array(bundle.dropLast())
        #expect(throws: CriuError.self) { try CriuImages.unpack(evil, into: directory + "/cut") }
        #expect(throws: CriuError.self) { try CriuImages.unpack(bundle + [0], into: directory + "/long") }
    }

    @Test func pagemapLazyEntries() throws {
        // Two magic words, pagemap_head {pages_id: 1}, then three entries:
        // lazy at 0x1000 x 2 (nr_pages field 5), present at 0x5000, lazy at 0x9000 x 1.
        func entry(_ vaddr: UInt64, _ flags: UInt64, _ pages: UInt64) -> [UInt8] {
            func varint(_ v: UInt64) -> [UInt8] {
                var v = v, out: [UInt8] = []
                repeat { out.append(UInt8(v & 0x7f) | (v > 0x7f ? 0x80 : 0)); v >>= 7 } while v > 0
                return out
            }
            let message = [0x08] + varint(vaddr) + [0x10, 0] + [0x20] + varint(flags) + [0x28] + varint(pages)
            return [UInt8(message.count), 0, 0, 0] + message
        }
        let image = [UInt8](repeating: 0, count: 8) + [2, 0, 0, 0, 0x08, 0x01]
            + entry(0x1000, 2, 2) + entry(0x5000, 4, 1) + entry(0x9000, 2, 1)
        let directory = "/tmp/ferry-criu-pagemap-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        try Data(image).write(to: URL(fileURLWithPath: directory + "/pagemap-1.img"))
        let lazy = try CriuImages.lazyRanges(directory: directory)
        #expect(lazy.keys.sorted() == [1])
        #expect(lazy[1]?.map(\.start) == [0x1000, 0x9000])
        #expect(lazy[1]?.map(\.pages) == [2, 1])
    }
}
