// The leecher's output: a directory with `manifest.json` and one file per
// migrated region (format in Protocols/image.md). Pages arrive in any order
// and regions change shape during pre-copy, so pages are kept in a slot file
// until the layout is final; the region files are assembled at the end, in
// a hidden `.NAME.partial-PID` directory that is renamed into place only when
// complete. A failed migration never leaves a directory that looks complete.
import Foundation
internal import CSodium
#if canImport(Glibc)
import Glibc
#endif

/// Where pulled pages go. The image writer is one; a live mapping is another.
public protocol PageSink: AnyObject {
    /// Stores whole pages; `data.count == range.length`.
    func store(_ range: AddressRange, data: UnsafeRawBufferPointer) throws
    /// Records pages known to be all zero.
    func storeZero(_ range: AddressRange) throws
}

/// One region of the manifest.
public struct ManifestRegion: Codable, Sendable, Equatable {
    public var start: UInt64
    public var end: UInt64
    public var prot: String
    public var offset: UInt64
    public var device: String
    public var inode: UInt64
    public var name: String
    /// `migrate`, `record` or `skip`.
    public var kind: String
    /// Path relative to the image directory; absent for regions not copied.
    public var file: String?
    /// BLAKE2b-256 of the region's `end - start` bytes, hexadecimal.
    public var blake2b: String?
}

/// `manifest.json`.
public struct Manifest: Codable, Sendable {
    public static let formatName = "ferry-image"
    public static let currentVersion = 1

    public var format: String = formatName
    public var version: Int = currentVersion
    public var pageSize: UInt64 = FerrySystem.pageSize
    public var sourcePid: Int32
    public var sourceHost: String
    public var tracker: String
    public var created: String
    public var downtimeMilliseconds: Double?
    public var regions: [ManifestRegion]

    enum CodingKeys: String, CodingKey {
        case format, version, regions, tracker, created
        case pageSize = "page_size"
        case sourcePid = "source_pid"
        case sourceHost = "source_host"
        case downtimeMilliseconds = "downtime_ms"
    }

    /// Reads and checks a manifest.
    public static func load(directory: String) throws -> Manifest {
        let path = directory + "/manifest.json"
        guard let data = FileManager.default.contents(atPath: path) else {
            throw MigrationError.image("cannot read \(path): is \(directory) a Ferry image?")
        }
        let manifest: Manifest
        do {
            manifest = try JSONDecoder().decode(Manifest.self, from: data)
        } catch {
            throw MigrationError.image("\(path) is not a valid manifest: \(error)")
        }
        guard manifest.format == formatName, manifest.version == currentVersion else {
            throw MigrationError.image(
                "\(path): format \(manifest.format) version \(manifest.version) is not \(formatName) version \(currentVersion)")
        }
        return manifest
    }
}

/// Collects pages during a migration and writes the image at the end.
public final class ImageWriter: PageSink {
    public let directory: String
    let partial: String
    private var slotFile: Int32
    /// Slot of each stored page in the slot file; `zeroSlot` for all-zero pages.
    private var slots: [UInt64: UInt32] = [:]
    private var nextSlot: UInt32 = 0
    private static let zeroSlot = UInt32.max
    private var finished = false

    /// Prepares to write an image to `directory`, which must not exist or be empty.
    public init(directory: String) throws {
        let url = URL(fileURLWithPath: directory).standardizedFileURL
        self.directory = url.path
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: self.directory, isDirectory: &isDirectory) {
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: self.directory)) ?? ["?"]
            guard isDirectory.boolValue, entries.isEmpty else {
                throw MigrationError.image(
                    "output \(self.directory) already exists and is not an empty directory: choose another --out or remove it")
            }
        }
        let parent = url.deletingLastPathComponent().path
        guard FileManager.default.fileExists(atPath: parent) else {
            throw MigrationError.image("cannot create \(self.directory): its parent \(parent) does not exist")
        }
        partial = parent + "/." + url.lastPathComponent + ".partial-\(getpid())"
        try? FileManager.default.removeItem(atPath: partial)
        guard mkdir(partial, 0o700) == 0 else {
            throw MigrationError.image("cannot create \(partial): \(String(cString: strerror(errno)))")
        }
        slotFile = open(partial + "/pages.slots", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard slotFile >= 0 else {
            let reason = String(cString: strerror(errno))
            try? FileManager.default.removeItem(atPath: partial)
            throw MigrationError.image("cannot create the page file in \(partial): \(reason)")
        }
    }

    deinit {
        if slotFile >= 0 { close(slotFile) }
        if !finished { try? FileManager.default.removeItem(atPath: partial) }
    }

    public func store(_ range: AddressRange, data: UnsafeRawBufferPointer) throws {
        precondition(UInt64(data.count) == range.length, "page data does not match its range")
        // Reuse slots of pages seen before; give new pages consecutive slots so
        // a batch is one write.
        var page = range.start
        var runStart = range.start
        var runSlot: UInt32? = nil
        func flush(until end: UInt64) throws {
            guard let slot = runSlot, end > runStart else { return }
            let offset = Int(runStart - range.start)
            let length = Int(end - runStart)
            try writeAll(slotFile, data.baseAddress! + offset, length, at: off_t(slot) * off_t(pageSize))
        }
        while page < range.end {
            let slot: UInt32
            if let existing = slots[page], existing != Self.zeroSlot {
                slot = existing
            } else {
                slot = nextSlot
                nextSlot += 1
                slots[page] = slot
            }
            if let current = runSlot, slot == current + UInt32((page - runStart) / pageSize) {
                // continues the run
            } else {
                try flush(until: page)
                runStart = page
                runSlot = slot
            }
            page += pageSize
        }
        try flush(until: range.end)
    }

    public func storeZero(_ range: AddressRange) throws {
        var page = range.start
        while page < range.end {
            slots[page] = Self.zeroSlot
            page += pageSize
        }
    }

    /// Whether every page of `range` has been stored (as data or as zero).
    public func holds(_ range: AddressRange) -> Bool {
        var page = range.start
        while page < range.end {
            if slots[page] == nil { return false }
            page += pageSize
        }
        return true
    }

    /// Writes the region files and the manifest for the final layout into the
    /// hidden partial directory. Every page of every migrated region must have
    /// been stored. `commit()` then moves the image into place.
    @discardableResult
    public func prepare(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                        downtimeMilliseconds: Double?) throws -> Manifest {
        try mkdirOrThrow(partial + "/regions")
        var entries: [ManifestRegion] = []
        for (index, region) in layout.enumerated() {
            var entry = ManifestRegion(
                start: region.start, end: region.end, prot: region.permissions, offset: region.offset,
                device: region.device, inode: region.inode, name: region.name, kind: region.kind.rawValue,
                file: nil, blake2b: nil)
            if region.kind == .migrate {
                let name = String(format: "regions/%04d-%llx.bin", index, region.start)
                entry.blake2b = try writeRegion(region.range, to: partial + "/" + name)
                entry.file = name
            }
            entries.append(entry)
        }
        let formatter = ISO8601DateFormatter()
        let manifest = Manifest(sourcePid: sourcePid, sourceHost: sourceHost, tracker: tracker,
                                created: formatter.string(from: Date()),
                                downtimeMilliseconds: downtimeMilliseconds, regions: entries)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let json = try encoder.encode(manifest)
        try writeFile(partial + "/manifest.json", json)
        return manifest
    }

    /// Moves the prepared image into place; until then nothing at `directory`
    /// looks like an image.
    public func commit() throws {
        close(slotFile)
        slotFile = -1
        unlink(partial + "/pages.slots")
        // An empty directory of the same name may be in the way (checked in init).
        rmdir(directory)
        guard rename(partial, directory) == 0 else {
            throw MigrationError.image("cannot move the finished image to \(directory): \(String(cString: strerror(errno)))")
        }
        finished = true
    }

    /// `prepare` then `commit`.
    @discardableResult
    public func finish(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                       downtimeMilliseconds: Double?) throws -> Manifest {
        let manifest = try prepare(layout: layout, sourcePid: sourcePid, sourceHost: sourceHost, tracker: tracker,
                                   downtimeMilliseconds: downtimeMilliseconds)
        try commit()
        return manifest
    }

    /// Writes one region file (all-zero pages stay holes) and returns its BLAKE2b-256.
    private func writeRegion(_ range: AddressRange, to path: String) throws -> String {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw MigrationError.image("cannot create \(path): \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        guard ftruncate(fd, off_t(range.length)) == 0 else {
            throw MigrationError.image("cannot size \(path) to \(range.length) bytes: \(String(cString: strerror(errno)))")
        }
        var hash = Blake2b256()
        let chunkPages = 256
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkPages * Int(pageSize), alignment: 4096)
        defer { buffer.deallocate() }
        var page = range.start
        while page < range.end {
            let count = min(chunkPages, Int((range.end - page) / pageSize))
            // Gather the chunk from its slots, coalescing consecutive slots into one read.
            var i = 0
            var anyData = false
            while i < count {
                let address = page + UInt64(i) * pageSize
                guard let slot = slots[address] else {
                    throw MigrationError.image(
                        "page 0x\(String(address, radix: 16)) of region \(range) was never received; the image is incomplete")
                }
                if slot == Self.zeroSlot {
                    memset(buffer.baseAddress! + i * Int(pageSize), 0, Int(pageSize))
                    i += 1
                    continue
                }
                var run = 1
                while i + run < count, slots[address + UInt64(run) * pageSize] == slot + UInt32(run) { run += 1 }
                try readAll(slotFile, buffer.baseAddress! + i * Int(pageSize), run * Int(pageSize),
                            at: off_t(slot) * off_t(pageSize))
                anyData = true
                i += run
            }
            let bytes = count * Int(pageSize)
            if anyData {
                try writeAll(fd, buffer.baseAddress!, bytes, at: off_t(page - range.start))
            }
            hash.update(UnsafeRawBufferPointer(rebasing: buffer[..<bytes]))
            page += UInt64(count) * pageSize
        }
        return hash.finish().hexString
    }
}

/// BLAKE2b-256 of a buffer, hexadecimal, as the manifest records it.
public func imageChecksum(_ bytes: UnsafeRawBufferPointer) -> String {
    var hash = Blake2b256()
    hash.update(bytes)
    return hash.finish().hexString
}

private let sodiumReady: Bool = sodium_init() >= 0

/// Streaming BLAKE2b-256, the checksum of image regions and of the seeder's
/// frozen memory, so the two can be compared.
struct Blake2b256: ~Copyable {
    private let state: UnsafeMutableRawPointer

    init() {
        _ = sodiumReady
        // SAFETY: libsodium's hash state wants 64-byte alignment, which a Swift
        // stored struct does not promise; this allocation lives as long as self.
        state = UnsafeMutableRawPointer.allocate(byteCount: crypto_generichash_statebytes(), alignment: 64)
        crypto_generichash_init(OpaquePointer(state), nil, 0, 32)
    }

    deinit { state.deallocate() }

    mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        crypto_generichash_update(OpaquePointer(state), base.assumingMemoryBound(to: UInt8.self), UInt64(bytes.count))
    }

    consuming func finish() -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: 32)
        crypto_generichash_final(OpaquePointer(state), &digest, 32)
        return digest
    }
}

private func mkdirOrThrow(_ path: String) throws {
    guard mkdir(path, 0o700) == 0 else {
        throw MigrationError.image("cannot create \(path): \(String(cString: strerror(errno)))")
    }
}

private func writeFile(_ path: String, _ data: Data) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw MigrationError.image("cannot create \(path): \(String(cString: strerror(errno)))") }
    defer { close(fd) }
    try data.withUnsafeBytes { try writeAll(fd, $0.baseAddress!, $0.count, at: 0) }
    fsync(fd)
}

private func writeAll(_ fd: Int32, _ pointer: UnsafeRawPointer, _ count: Int, at offset: off_t) throws {
    var done = 0
    while done < count {
        let n = pwrite(fd, pointer + done, count - done, offset + off_t(done))
        if n < 0 {
            if errno == EINTR { continue }
            throw MigrationError.image("cannot write the image: \(String(cString: strerror(errno))) (is the disk full?)")
        }
        done += n
    }
}

private func readAll(_ fd: Int32, _ pointer: UnsafeMutableRawPointer, _ count: Int, at offset: off_t) throws {
    var done = 0
    while done < count {
        let n = pread(fd, pointer + done, count - done, offset + off_t(done))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else {
            throw MigrationError.image("cannot read back stored pages: \(n < 0 ? String(cString: strerror(errno)) : "short file")")
        }
        done += n
    }
}
