import Foundation
import Testing
@testable import FerryMigration

@Suite struct ImageWriterTests {
    private func scratch(_ name: String) -> String {
        let path = "/tmp/ferry-image-tests-\(getpid())-\(name)"
        try? FileManager.default.removeItem(atPath: path)
        return path
    }

    private func region(_ start: UInt64, _ end: UInt64, kind: RegionKind = .migrate) -> Region {
        Region(range: AddressRange(start: start, end: end), permissions: "rw-p", offset: 0, device: "00:00",
               inode: 0, name: "[heap]", kind: kind)
    }

    @Test func writesRegionFilesThatMatchTheStoredPages() throws {
        let out = scratch("ok")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = try ImageWriter(directory: out)
        let range = AddressRange(start: 0x100000, end: 0x104000)
        var bytes = [UInt8](repeating: 0, count: 4 * 4096)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i * 7 + 1) }
        // Out of order, with a rewrite and a zero page.
        try bytes.withUnsafeBytes { all in
            try writer.store(AddressRange(start: 0x102000, end: 0x104000), data: UnsafeRawBufferPointer(rebasing: all[8192...]))
            try writer.store(AddressRange(start: 0x100000, end: 0x101000), data: UnsafeRawBufferPointer(rebasing: all[..<4096]))
        }
        try writer.storeZero(AddressRange(start: 0x101000, end: 0x102000))
        for i in 0..<4096 { bytes[i] = 0xAB }
        try bytes.withUnsafeBytes { all in
            try writer.store(AddressRange(start: 0x100000, end: 0x101000), data: UnsafeRawBufferPointer(rebasing: all[..<4096]))
        }
        for i in 4096..<8192 { bytes[i] = 0 }
        let layout = [region(0x100000, 0x104000), region(0x200000, 0x201000, kind: .recordOnly)]
        let manifest = try writer.finish(layout: layout, sourcePid: 42, sourceHost: "here", tracker: "async",
                                         downtimeMilliseconds: 1.5)
        #expect(!FileManager.default.fileExists(atPath: writer.partial))
        let loaded = try Manifest.load(directory: out)
        #expect(loaded.regions == manifest.regions)
        #expect(loaded.regions.count == 2)
        #expect(loaded.regions[1].file == nil)
        let file = try #require(loaded.regions[0].file)
        let data = try Data(contentsOf: URL(fileURLWithPath: out + "/" + file))
        #expect([UInt8](data) == bytes)
        #expect(loaded.regions[0].blake2b == bytes.withUnsafeBytes { imageChecksum($0) })
        let mode = try FileManager.default.attributesOfItem(atPath: out + "/" + file)[.posixPermissions] as? Int
        #expect(mode == 0o600)
        #expect(range.pageCount == 4)
    }

    @Test func incompleteImagesAreNotLeftBehind() throws {
        let out = scratch("incomplete")
        let writer = try ImageWriter(directory: out)
        #expect(throws: MigrationError.self) {
            try writer.finish(layout: [region(0x100000, 0x102000)], sourcePid: 1, sourceHost: "h", tracker: "t",
                              downtimeMilliseconds: nil)
        }
        let partial = writer.partial
        _ = consume writer
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(!FileManager.default.fileExists(atPath: partial))
    }

    @Test func refusesANonEmptyOutput() throws {
        let out = scratch("busy")
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: out) }
        _ = FileManager.default.createFile(atPath: out + "/x", contents: Data([1]))
        #expect(throws: MigrationError.image(
            "output \(out) already exists and is not an empty directory: choose another --out or remove it")) {
            _ = try ImageWriter(directory: out)
        }
    }
}
