import Foundation
import Testing
import FerryTestSupport
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

    @Test func writesRegionFilesThatMatchTheStoredPages() async throws {
        let out = scratch("ok")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = try ImageWriter(directory: out)
        let range = AddressRange(start: 0x100000, end: 0x104000)
        var bytes = [UInt8](repeating: 0, count: 4 * 4096)
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: i * 7 + 1) }
        writer.adopt(layout: [region(0x100000, 0x104000)])
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
        writer.adopt(layout: layout)
        let manifest = try await writer.finish(layout: layout, sourcePid: 42, sourceHost: "here", tracker: "async",
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

    @Test func incompleteImagesAreNotLeftBehind() async throws {
        let out = scratch("incomplete")
        let writer = try ImageWriter(directory: out)
        await #expect(throws: MigrationError.self) {
            try await writer.finish(layout: [region(0x100000, 0x102000)], sourcePid: 1, sourceHost: "h", tracker: "t",
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

    // MARK: - Written once, while the layout changes


    /// What the image must hold: the last bytes stored for each page still covered.
    private struct Model {
        var pages: [UInt64: [UInt8]] = [:]
        var layout: [Region] = []

        func covered(_ page: UInt64) -> Bool {
            layout.contains { $0.kind == .migrate && $0.range.contains(page) }
        }

        mutating func adopt(_ layout: [Region]) {
            self.layout = layout
            pages = pages.filter { covered($0.key) }
        }
    }

    private static let base: UInt64 = 0x7f00_0000_0000

    /// Region of pages `[first, end)` above `base`.
    private func pages(_ first: UInt64, _ end: UInt64, kind: RegionKind = .migrate) -> Region {
        region(Self.base + first * pageSize, Self.base + end * pageSize, kind: kind)
    }

    /// Stores `count` random runs of pages (data or zero) across the model's layout,
    /// some of them straddling region boundaries or falling outside every region.
    private func storeRandomRuns(_ writer: ImageWriter, _ model: inout Model, count: Int,
                                 _ random: inout SeededRandom) throws {
        let spans = model.layout.filter { $0.kind == .migrate }
        for _ in 0..<count {
            let span = spans.randomElement(using: &random)!
            let first = span.start / pageSize + UInt64.random(in: 0..<span.range.pageCount, using: &random)
            let length = UInt64.random(in: 1...12, using: &random)
            let range = AddressRange(start: first * pageSize, end: (first + length) * pageSize)
            if Int.random(in: 0..<4, using: &random) == 0 {
                try writer.storeZero(range)
                for page in stride(from: range.start, to: range.end, by: Int(pageSize)) where model.covered(page) {
                    model.pages[page] = [UInt8](repeating: 0, count: Int(pageSize))
                }
            } else {
                var bytes = [UInt8](repeating: 0, count: Int(range.length))
                for i in stride(from: 0, to: bytes.count, by: 8) {
                    withUnsafeBytes(of: random.next()) { word in
                        for j in 0..<8 { bytes[i + j] = word[j] }
                    }
                }
                try bytes.withUnsafeBytes { try writer.store(range, data: $0) }
                for (i, page) in stride(from: range.start, to: range.end, by: Int(pageSize)).enumerated()
                where model.covered(page) {
                    model.pages[page] = Array(bytes[i * Int(pageSize)..<(i + 1) * Int(pageSize)])
                }
            }
        }
    }

    /// Checks every migrated region file of the image at `out` against the model.
    private func expectImage(_ out: String, equals model: Model, _ manifest: Manifest) throws {
        let migrated = manifest.regions.filter { $0.kind == "migrate" }
        #expect(migrated.count == model.layout.filter { $0.kind == .migrate }.count)
        for entry in migrated {
            let file = try #require(entry.file)
            var expected: [UInt8] = []
            for page in stride(from: entry.start, to: entry.end, by: Int(pageSize)) {
                expected += try #require(model.pages[page], "page 0x\(String(page, radix: 16)) missing in the model")
            }
            let data = try Data(contentsOf: URL(fileURLWithPath: out + "/" + file))
            #expect([UInt8](data) == expected, "\(file) differs from the pages stored")
            #expect(entry.blake2b == expected.withUnsafeBytes { imageChecksum($0) })
        }
    }

    @Test(arguments: [1, 2, 3, 4])
    func storedPagesSurviveSplitsGrowthShrinksAndMoves(seed: UInt64) async throws {
        let out = scratch("reshape-\(seed)")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = try ImageWriter(directory: out)
        var random = SeededRandom(seed: seed)
        var model = Model()
        let layouts: [[Region]] = [
            [pages(0, 64), pages(100, 132), pages(200, 216)],
            // mprotect splits the first region in three; the second grows, the third
            // shrinks; a new region appears.
            [pages(0, 20), pages(20, 40), pages(40, 64), pages(100, 160), pages(200, 208), pages(300, 310)],
            // The three parts merge again; the second is unmapped and mapped elsewhere;
            // the third vanishes; the fourth grows downwards, like a stack.
            [pages(0, 64), pages(290, 310), pages(400, 460)],
            // The address of the vanished region is mapped again; the first region
            // splits at another place; a region the image only records appears.
            [pages(0, 30), pages(30, 64), pages(200, 216), pages(290, 310), pages(400, 460),
             pages(500, 510, kind: .recordOnly)],
        ]
        for layout in layouts {
            writer.adopt(layout: layout)
            model.adopt(layout)
            try storeRandomRuns(writer, &model, count: 40, &random)
        }
        // Finalize: some held pages are clean, the rest (and every page never
        // stored) comes again by post-copy, in address order.
        let final = layouts.last!
        var clean: [AddressRange] = []
        for page in model.pages.keys.sorted() where Bool.random(using: &random) {
            if let last = clean.last, last.end == page {
                clean[clean.count - 1].end = page + pageSize
            } else {
                clean.append(AddressRange(start: page, end: page + pageSize))
            }
        }
        writer.sourceFrozen(layout: final, clean: clean)
        let cleanPages = Set(clean.flatMap { stride(from: $0.start, to: $0.end, by: Int(pageSize)) })
        for region in final where region.kind == .migrate {
            for page in stride(from: region.start, to: region.end, by: Int(pageSize)) where !cleanPages.contains(page) {
                var bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: page >> 12), count: Int(pageSize))
                bytes[0] = 0xEE
                try bytes.withUnsafeBytes { try writer.store(AddressRange(start: page, end: page + pageSize), data: $0) }
                model.pages[page] = bytes
            }
        }
        let manifest = try await writer.finish(layout: final, sourcePid: 7, sourceHost: "h", tracker: "async",
                                               downtimeMilliseconds: nil)
        try expectImage(out, equals: model, manifest)
        #expect(manifest.regions.count == final.count)
        // Splits and downward growth moved pages between files.
        #expect(writer.statistics.bytesCopied > 0)
    }

    @Test func eachPageIsWrittenOnceStraightIntoItsRegionFile() async throws {
        let out = scratch("once")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = try ImageWriter(directory: out)
        let layout = [pages(0, 256), pages(300, 301)]
        writer.adopt(layout: layout)
        var random = SeededRandom(seed: 9)
        var model = Model()
        model.adopt(layout)
        var bytes = [UInt8](repeating: 0, count: 257 * Int(pageSize))
        for i in stride(from: 0, to: bytes.count, by: 8) {
            withUnsafeBytes(of: random.next()) { word in for j in 0..<8 { bytes[i + j] = word[j] } }
        }
        // Batches of 64 pages, the second-to-last page of the big region zero.
        for first in stride(from: 0, to: 256, by: 64) {
            let range = AddressRange(start: Self.base + UInt64(first) * pageSize, end: Self.base + UInt64(first + 64) * pageSize)
            try writer.store(range, from: bytes, at: first * Int(pageSize))
        }
        try writer.storeZero(AddressRange(start: Self.base + 254 * pageSize, end: Self.base + 255 * pageSize))
        try writer.store(layout[1].range, from: bytes, at: 256 * Int(pageSize))
        for page in 0..<257 {
            let address = Self.base + UInt64(page < 256 ? page : 300) * pageSize
            model.pages[address] = page == 254 ? [UInt8](repeating: 0, count: Int(pageSize))
                : Array(bytes[page * Int(pageSize)..<(page + 1) * Int(pageSize)])
        }
        writer.sourceFrozen(layout: layout, clean: layout.map(\.range))
        // No staging file: the partial directory holds the region files only.
        let staged = try FileManager.default.subpathsOfDirectory(atPath: writer.partial)
        #expect(staged.allSatisfy { $0 == "regions" || ($0.hasPrefix("regions/") && $0.hasSuffix(".bin")) }, "\(staged)")
        let manifest = try await writer.finish(layout: layout, sourcePid: 7, sourceHost: "h", tracker: "async",
                                               downtimeMilliseconds: nil)
        try expectImage(out, equals: model, manifest)
        #expect(writer.statistics.bytesWritten == 257 * pageSize)
        #expect(writer.statistics.bytesCopied == 0)
        #expect(Set(try FileManager.default.subpathsOfDirectory(atPath: out))
                == ["manifest.json", "regions", "regions/0000-\(String(layout[0].start, radix: 16)).bin",
                    "regions/0001-\(String(layout[1].start, radix: 16)).bin"])
        // The zero page is a hole: the big region's file has fewer blocks than bytes.
        var info = stat()
        #expect(stat(out + "/regions/0000-\(String(layout[0].start, radix: 16)).bin", &info) == 0)
        #expect(Int(info.st_blocks) * 512 < 256 * Int(pageSize))
    }

    @Test func imageFilesAndDirectoriesAreTheOwnersOnly() async throws {
        let out = scratch("modes")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = try ImageWriter(directory: out)
        let layout = [pages(0, 4), pages(10, 12)]
        writer.adopt(layout: layout)
        let data = [UInt8](repeating: 0x5A, count: 4 * Int(pageSize))
        for region in layout { try writer.store(region.range, from: data, at: 0) }
        #expect(try mode(writer.partial) == 0o700)
        #expect(try mode(writer.partial + "/regions") == 0o700)
        try await writer.finish(layout: layout, sourcePid: 7, sourceHost: "h", tracker: "async", downtimeMilliseconds: nil)
        #expect(try mode(out) == 0o700)
        #expect(try mode(out + "/regions") == 0o700)
        for path in try FileManager.default.subpathsOfDirectory(atPath: out) where path.hasSuffix(".bin") || path.hasSuffix(".json") {
            #expect(try mode(out + "/" + path) == 0o600, "\(path)")
        }
    }

    private func mode(_ path: String) throws -> Int {
        try #require(try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int)
    }

    @Test func aFailedMigrationLeavesNothingThatLooksComplete() async throws {
        // Dropped mid-way (the leecher failed after Finalize, while hashing).
        let out = scratch("failed")
        var writer: ImageWriter? = try ImageWriter(directory: out)
        let layout = [pages(0, 512)]
        writer!.adopt(layout: layout)
        let data = [UInt8](repeating: 0x11, count: 512 * Int(pageSize))
        try writer!.store(layout[0].range, from: data, at: 0)
        writer!.sourceFrozen(layout: layout, clean: [layout[0].range])
        let partial = writer!.partial
        writer = nil
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(!FileManager.default.fileExists(atPath: partial))

        // Prepared but a page missing: prepare fails, nothing at `out` and no manifest anywhere.
        let second = try ImageWriter(directory: out)
        second.adopt(layout: layout)
        try second.store(AddressRange(start: layout[0].start, end: layout[0].end - pageSize), from: data, at: 0)
        await #expect(throws: MigrationError.self) {
            try await second.prepare(layout: layout, sourcePid: 7, sourceHost: "h", tracker: "async",
                                     downtimeMilliseconds: nil)
        }
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(!FileManager.default.fileExists(atPath: second.partial + "/manifest.json"))
        let secondPartial = second.partial
        _ = consume second
        #expect(!FileManager.default.fileExists(atPath: secondPartial))
    }

    @Test func checksumsAdvanceWhilePostCopyRuns() async throws {
        let out = scratch("overlap")
        defer { try? FileManager.default.removeItem(atPath: out) }
        let writer = try ImageWriter(directory: out)
        let layout = [pages(0, 1024)]
        writer.adopt(layout: layout)
        var random = SeededRandom(seed: 5)
        var model = Model()
        model.adopt(layout)
        func fill(_ first: Int, _ count: Int) throws {
            var bytes = [UInt8](repeating: 0, count: count * Int(pageSize))
            for i in stride(from: 0, to: bytes.count, by: 8) {
                withUnsafeBytes(of: random.next()) { word in for j in 0..<8 { bytes[i + j] = word[j] } }
            }
            let range = AddressRange(start: Self.base + UInt64(first) * pageSize,
                                     end: Self.base + UInt64(first + count) * pageSize)
            try writer.store(range, from: bytes, at: 0)
            for page in 0..<count {
                model.pages[range.start + UInt64(page) * pageSize] = Array(bytes[page * Int(pageSize)..<(page + 1) * Int(pageSize)])
            }
        }
        // Pre-copy: everything but the last 24 pages; page 300 is written at the source again.
        try fill(0, 1000)
        try await Task.sleep(for: .milliseconds(50))
        #expect(writer.statistics.pagesHashed == 0, "nothing is final before Finalize")
        writer.sourceFrozen(layout: layout, clean: [AddressRange(start: Self.base, end: Self.base + 300 * pageSize),
                                                    AddressRange(start: Self.base + 301 * pageSize, end: Self.base + 1000 * pageSize)])
        // The pages held clean below the first missing one are hashed before post-copy stores it.
        let deadline = ContinuousClock.now + .seconds(10)
        while writer.statistics.pagesHashed < 300 && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(5))
        }
        #expect(writer.statistics.pagesHashed == 300)
        // Post-copy, in address order; then a hashed page comes again (a lost reply asked twice).
        try fill(300, 1)
        try fill(1000, 24)
        try fill(10, 1)
        let manifest = try await writer.finish(layout: layout, sourcePid: 7, sourceHost: "h", tracker: "async",
                                               downtimeMilliseconds: nil)
        try expectImage(out, equals: model, manifest)
    }
}
