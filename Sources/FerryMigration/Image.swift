// The leecher's output: a directory with `manifest.json` and one file per
// migrated region (format in Protocols/image.md). Pages are written once,
// straight into their region's file, in a hidden `.NAME.partial-PID`
// directory that is renamed into place only when complete; regions change
// shape during pre-copy and their files follow (RegionFiles). After Finalize
// each region's BLAKE2b-256 is computed while post-copy runs, not after it.
// File I/O and hashing run on the writer's own thread, never on the Swift
// cooperative pool. A failed migration never leaves a directory that looks
// complete.
import Foundation
import FerryToolkit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// What pulled pages are stored into: the image writer, live memory (both
/// `Destination`s of the leecher).
public protocol PageSink: AnyObject {
    /// Stores whole pages; `data.count == range.length`.
    func store(_ range: AddressRange, data: UnsafeRawBufferPointer) throws
    /// Stores whole pages that are `part[offset ..< offset + range.length]`.
    /// A sink may keep `part` (a reply buffer, shared, not copied) until it
    /// has written them.
    func store(_ range: AddressRange, from part: [UInt8], at offset: Int) throws
    /// Records pages known to be all zero.
    func storeZero(_ range: AddressRange) throws
    /// Records pages that are mapped in the source but backed by nothing
    /// (past the end of their file): touching them raises SIGBUS there.
    func storeHole(_ range: AddressRange) throws
    /// The leecher adopted `layout` (its first one, a Sync reply's, the
    /// final one): pages at addresses still covered by a migratable region
    /// stay stored, pages of addresses no longer covered are dropped.
    /// Problems surface at the next store or at the end.
    func adopt(layout: [Region])
    /// Finalize returned: `layout` is final, the source is frozen, the pages
    /// of `clean` hold its bytes, and every other page of the layout will be
    /// stored again (post-copy) before the end: from now on they are remote.
    func sourceFrozen(layout: [Region], clean: [AddressRange]) throws
}

extension PageSink {
    public func store(_ range: AddressRange, from part: [UInt8], at offset: Int) throws {
        try part.withUnsafeBytes { bytes in
            try store(range, data: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + Int(range.length)]))
        }
    }

    public func adopt(layout: [Region]) {}
    public func sourceFrozen(layout: [Region], clean: [AddressRange]) {}
    /// A sink that cannot mark a hole keeps zeros there.
    public func storeHole(_ range: AddressRange) throws { try storeZero(range) }
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
    /// Ranges `[start, end)` of the region that nothing backs in the source
    /// (past the end of its file): zeros in the file, SIGBUS when touched.
    public var holes: [[UInt64]]? = nil
    /// Bytes per page of a hugetlb region (2 MiB, 1 GiB): the destination
    /// must map it with pages of this size. Absent for ordinary memory,
    /// whose pages are the manifest's `page_size`.
    public var pageSize: UInt64? = nil

    enum CodingKeys: String, CodingKey {
        case start, end, prot, offset, device, inode, name, kind, file, blake2b, holes
        case pageSize = "page_size"
    }
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

/// Writes an image as a migration runs: pages go to their region's file as
/// they arrive, checksums follow the post-copy fill, and `prepare` only
/// finishes what is left and writes the manifest.
///
/// Threading: the calls of one migration come from one task, in order
/// (the leecher's); the work runs on the writer's thread (ImageWorker).
public final class ImageWriter: PageSink {
    public let directory: String
    let partial: String
    private let worker: ImageWorker
    private var finished = false
    /// Pages stored as holes (rare: only pages past the end of a file).
    private let holes = HolePages()

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
            throw MigrationError.image("cannot create \(partial): \(SystemError(operation: "mkdir", target: partial, errno: errno))")
        }
        do {
            worker = try ImageWorker(files: RegionFiles(directory: partial + "/regions"), name: self.directory)
        } catch {
            try? FileManager.default.removeItem(atPath: partial)
            throw error
        }
    }

    deinit {
        worker.stop()
        if !finished { try? FileManager.default.removeItem(atPath: partial) }
    }

    public func store(_ range: AddressRange, data: UnsafeRawBufferPointer) throws {
        precondition(UInt64(data.count) == range.length, "page data does not match its range")
        backed(range)
        try worker.submit(.write(range, [UInt8](data), 0), bytes: data.count)
    }

    public func store(_ range: AddressRange, from part: [UInt8], at offset: Int) throws {
        precondition(offset >= 0 && offset + Int(range.length) <= part.count, "page data does not match its range")
        backed(range)
        try worker.submit(.write(range, part, offset), bytes: Int(range.length))
    }

    public func storeZero(_ range: AddressRange) throws {
        backed(range)
        try worker.submit(.zero(range), bytes: 0)
    }

    public func storeHole(_ range: AddressRange) throws {
        holes.insert(range)
        try worker.submit(.zero(range), bytes: 0)
    }

    private func backed(_ range: AddressRange) { holes.backed(range) }

    public func adopt(layout: [Region]) {
        // A failure is kept and thrown by the next store or by `prepare`.
        try? worker.submit(.adopt(layout), bytes: 0)
    }

    public func sourceFrozen(layout: [Region], clean: [AddressRange]) {
        try? worker.submit(.frozen(layout, clean), bytes: 0)
    }

    /// What the writer's thread has done so far (updated after each batch of jobs).
    var statistics: ImageWriterStatistics { worker.statistics }

    /// Completes the region files for the final layout (every page of every
    /// migrated region must have been stored), finishes their checksums and
    /// writes the manifest, in the hidden partial directory. `commit()` then
    /// moves the image into place.
    @discardableResult
    public func prepare(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                        downtimeMilliseconds: Double?) async throws -> Manifest {
        let manifestPath = partial + "/manifest.json"
        return try await withCheckedThrowingContinuation { continuation in
            let holes = self.holes.snapshot()
            let writeManifest: @Sendable ([ManifestRegion]) throws -> Manifest = { found in
                var entries = found
                for index in entries.indices where entries[index].file != nil {
                    entries[index].holes = HolePages.manifestRanges(holes.filter { $0 >= entries[index].start && $0 < entries[index].end })
                }
                let manifest = Manifest(sourcePid: sourcePid, sourceHost: sourceHost, tracker: tracker,
                                        created: ISO8601DateFormatter().string(from: Date()),
                                        downtimeMilliseconds: downtimeMilliseconds, regions: entries)
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
                try writeFile(manifestPath, try encoder.encode(manifest))
                return manifest
            }
            do {
                try worker.submit(.finish(layout, writeManifest, continuation), bytes: 0)
            } catch {
                continuation.resume(throwing: error)
            }
        }
    }

    /// Moves the prepared image into place; until then nothing at `directory`
    /// looks like an image.
    public func commit() throws {
        // An empty directory of the same name may be in the way (checked in init).
        rmdir(directory)
        guard rename(partial, directory) == 0 else {
            throw MigrationError.image(
                "cannot move the finished image to \(directory): \(SystemError(operation: "rename", target: partial, errno: errno))")
        }
        finished = true
    }

    /// `prepare` then `commit`.
    @discardableResult
    public func finish(layout: [Region], sourcePid: Int32, sourceHost: String, tracker: String,
                       downtimeMilliseconds: Double?) async throws -> Manifest {
        let manifest = try await prepare(layout: layout, sourcePid: sourcePid, sourceHost: sourceHost,
                                         tracker: tracker, downtimeMilliseconds: downtimeMilliseconds)
        try commit()
        return manifest
    }
}

/// BLAKE2b-256 of a buffer, hexadecimal, as the manifest records it.
public func imageChecksum(_ bytes: UnsafeRawBufferPointer) -> String {
    var hash = Blake2b256()
    hash.update(bytes)
    return hash.finish().hexString
}

/// Pages a destination stored as holes (mapped in the source, but nothing
/// backs them: past the end of a file), which a page that arrives with data
/// later (the file grew) stops being. Rare, so cheap when empty.
final class HolePages: Sendable {
    private let pages = Mutex<Set<UInt64>>([])

    func insert(_ range: AddressRange) {
        pages.withLock { pages in
            for page in stride(from: range.start, to: range.end, by: Int(pageSize)) { pages.insert(page) }
        }
    }

    /// Pages of `range` hold data now: no longer holes.
    func backed(_ range: AddressRange) {
        pages.withLock { pages in
            guard !pages.isEmpty else { return }
            for page in stride(from: range.start, to: range.end, by: Int(pageSize)) { pages.remove(page) }
        }
    }

    func snapshot() -> Set<UInt64> { pages.withLock { $0 } }

    /// The hole pages of `start..<end`, as sorted ranges.
    func ranges(from start: UInt64, to end: UInt64) -> [AddressRange] {
        let inside = pages.withLock { $0.filter { $0 >= start && $0 < end } }
        return Ranges.fromPages(inside.sorted().map { $0 / pageSize })
    }

    /// A manifest entry's `holes`: ranges of `pages`, or nil when there are none.
    static func manifestRanges(_ pages: Set<UInt64>) -> [[UInt64]]? {
        guard !pages.isEmpty else { return nil }
        return Ranges.fromPages(pages.sorted().map { $0 / pageSize }).map { [$0.start, $0.end] }
    }
}

func writeFile(_ path: String, _ data: Data) throws {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else {
        throw MigrationError.image("cannot create \(path): \(SystemError(operation: "open", target: path, errno: errno))")
    }
    defer { close(fd) }
    try data.withUnsafeBytes { try writeFully(fd, $0.baseAddress!, $0.count, at: 0, path: path) }
    fsync(fd)
}
