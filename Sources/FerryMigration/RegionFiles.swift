// The image's region files while a migration runs: one file per migrated
// region of the leecher's current layout, written in place as pages arrive,
// so each page is written once (all-zero pages stay holes). When the layout
// changes (regions appear, grow, shrink, split by mprotect, vanish), a file
// whose region keeps its start address is kept and resized; the pages of
// other still-covered addresses are copied into their new region's file,
// data extents only (SEEK_DATA, copy_file_range); pages no longer covered
// are dropped. One bit a page records which pages are held.
//
// After Finalize the pages held clean are the frozen source's and post-copy
// stores the rest, so each region's BLAKE2b-256 advances in address order
// over the held pages while post-copy runs, instead of in a pass after it.
// (Hashing ahead during pre-copy would not shorten the migration: the seeder
// hashes the whole frozen source after the freeze anyway, at the same speed,
// and starts later; it would only take CPU from the transfer.)
//
// Threading: not thread-safe. The image writer's thread owns the one
// instance and makes every call (see ImageWriter).
import Foundation
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

/// The region files of one image, in address order.
final class RegionFiles {
    /// `…/.NAME.partial-PID/regions`.
    let directory: String
    private(set) var files: [RegionFile] = []
    /// After Finalize: held pages are final and are hashed.
    private(set) var hashing = false
    /// Bytes of page data written to region files, and bytes copied between
    /// them by layout changes: what "written once" is checked by.
    private(set) var bytesWritten: UInt64 = 0
    private(set) var bytesCopied: UInt64 = 0
    /// Pages hashed, counting those hashed again after a restart.
    private(set) var pagesHashed = 0
    private var nextFile = 0
    /// Scratch space for hashing and for copies without copy_file_range.
    private let buffer: UnsafeMutableRawBufferPointer
    /// Hashing reads this many bytes a step: about 1 ms of BLAKE2b here, so
    /// queued writes never wait long behind it.
    static let hashStepBytes = 1 << 20

    init(directory: String) throws {
        self.directory = directory
        guard mkdir(directory, 0o700) == 0 else {
            throw MigrationError.image("cannot create \(directory): \(SystemError(operation: "mkdir", target: directory, errno: errno))")
        }
        // SAFETY: owned by this object, freed in deinit.
        buffer = .allocate(byteCount: Self.hashStepBytes, alignment: Int(pageSize))
    }

    deinit { buffer.deallocate() }

    // MARK: - Layout

    /// Adopts the migratable regions of `layout`. Pages at addresses still
    /// covered keep their data and held bit; pages no longer covered are dropped.
    func adopt(_ layout: [Region]) throws {
        let wanted = layout.filter { $0.kind == .migrate && $0.range.length > 0 }.map(\.range)
            .sorted { $0.start < $1.start }
        if wanted == files.map(\.range) { return }
        let old = files
        var byStart: [UInt64: RegionFile] = [:]
        for file in old { byStart[file.range.start] = file }
        // Plan: a region keeps the file that starts where it starts, else gets a new one.
        var planned: [(range: AddressRange, file: RegionFile, reused: Bool)] = []
        for range in wanted {
            if let file = byStart.removeValue(forKey: range.start) {
                planned.append((range, file, true))
            } else {
                planned.append((range, try createFile(range), false))
            }
        }
        // Copy what other files hold for each region's addresses. A kept
        // file's own pages stay where they are, and what lands in it lies past
        // its old end, so no copy overwrites a page another copy still reads.
        var newHeld: [PageBitmap] = []
        for (range, target, reused) in planned {
            var held = reused ? target.held.resized(to: Int(range.pageCount)) : PageBitmap(count: Int(range.pageCount))
            for source in overlapping(old, range) where source !== target {
                let from = max(source.range.start, range.start)
                let to = min(source.range.end, range.end)
                try copyHeld(from: source, AddressRange(start: from, end: to), to: target, at: range.start)
                let s = Int((from - source.range.start) / pageSize)
                let d = Int((from - range.start) / pageSize)
                var i = source.held.first(true, from: s)
                let stop = s + Int((to - from) / pageSize)
                while i < stop {
                    let end = min(stop, source.held.first(false, from: i))
                    held.set((d + i - s)..<(d + end - s))
                    i = source.held.first(true, from: end)
                }
            }
            newHeld.append(held)
        }
        // Resize the kept files (a shrink drops the pages past the new end).
        for ((range, file, reused), held) in zip(planned, newHeld) {
            if reused && file.range != range {
                guard ftruncate(file.fd, off_t(range.length)) == 0 else {
                    throw MigrationError.image(
                        "cannot resize \(file.path) to \(range.length) bytes: \(SystemError(operation: "ftruncate", target: file.path, errno: errno))")
                }
            }
            if file.range != range || file.held != held { file.restartHash() }
            file.range = range
            file.held = held
        }
        // Drop the files no region kept.
        for file in byStart.values { unlink(file.path) }
        files = planned.map(\.file)
    }

    private func createFile(_ range: AddressRange) throws -> RegionFile {
        let path = directory + "/w\(nextFile).bin"
        nextFile += 1
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw MigrationError.image("cannot create \(path): \(SystemError(operation: "open", target: path, errno: errno))")
        }
        let file = RegionFile(range: range, path: path, fd: fd)
        guard ftruncate(fd, off_t(range.length)) == 0 else {
            let reason = SystemError(operation: "ftruncate", target: path, errno: errno)
            unlink(path)
            throw MigrationError.image("cannot size \(path) to \(range.length) bytes: \(reason) (is the disk full?)")
        }
        return file
    }

    /// Files of `list` (in address order) that overlap `range`.
    private func overlapping(_ list: [RegionFile], _ range: AddressRange) -> ArraySlice<RegionFile> {
        let low = Ranges.firstIndex(in: list, endingAfter: range.start) { $0.range.end }
        var end = low
        while end < list.count, list[end].range.start < range.end { end += 1 }
        return list[low..<end]
    }

    /// Copies the held pages of `part` (addresses within `source`) into
    /// `target`, whose region starts at `base`; holes stay holes.
    private func copyHeld(from source: RegionFile, _ part: AddressRange, to target: RegionFile, at base: UInt64) throws {
        let first = Int((part.start - source.range.start) / pageSize)
        let stop = first + Int(part.pageCount)
        var i = source.held.first(true, from: first)
        while i < stop {
            let end = min(stop, source.held.first(false, from: i))
            // Only the data extents of the run: zero pages are holes in both files.
            var offset = off_t(i) * off_t(pageSize)
            let runEnd = off_t(end) * off_t(pageSize)
            while offset < runEnd {
                var data = lseek(source.fd, offset, Self.seekData)
                if data < 0 && errno == ENXIO { break } // only a hole from here to the end
                var hole = data < 0 ? -1 : lseek(source.fd, data, Self.seekHole)
                if data < 0 || hole < 0 {
                    // No SEEK_DATA on this file system: copy the whole run.
                    data = offset
                    hole = runEnd
                }
                if data >= runEnd { break }
                hole = min(runEnd, max(data + 1, hole))
                let to = data + off_t(Int64(bitPattern: source.range.start) - Int64(bitPattern: base))
                try copyBytes(source, at: data, count: Int(hole - data), to: target, at: to)
                offset = hole
            }
            i = source.held.first(true, from: end)
        }
    }

    private func copyBytes(_ source: RegionFile, at from: off_t, count: Int, to target: RegionFile, at to: off_t) throws {
        // In the kernel where the file system can; what it cannot, through memory.
        var done = FileRanges.copy(from: source.fd, at: Int64(from), to: target.fd, at: Int64(to), count: count)
        while done < count {
            let step = min(buffer.count, count - done)
            try readFully(source.fd, buffer.baseAddress!, step, at: from + off_t(done), path: source.path)
            try writeFully(target.fd, UnsafeRawPointer(buffer.baseAddress!), step, at: to + off_t(done), path: target.path)
            done += step
        }
        bytesCopied += UInt64(count)
    }

    // MARK: - Pages

    /// Writes pages; addresses no region covers are ignored (their region
    /// went away, so the pages no longer matter).
    func write(_ range: AddressRange, _ bytes: UnsafeRawBufferPointer) throws {
        try forEachPart(of: range) { file, part in
            try writeFully(file.fd, bytes.baseAddress! + Int(part.start - range.start), Int(part.length),
                           at: file.offset(of: part.start), path: file.path)
            bytesWritten += part.length
        }
    }

    /// Records all-zero pages: holes (punched, in case the page held data before).
    func writeZero(_ range: AddressRange) throws {
        try forEachPart(of: range) { file, part in
            let offset = file.offset(of: part.start)
            if FileRanges.punchHole(file.fd, at: Int64(offset), length: Int64(part.length)) { return }
            // No hole punching here: write the zeros.
            memset(buffer.baseAddress!, 0, min(buffer.count, Int(part.length)))
            var done: UInt64 = 0
            while done < part.length {
                let step = min(UInt64(buffer.count), part.length - done)
                try writeFully(file.fd, UnsafeRawPointer(buffer.baseAddress!), Int(step), at: offset + off_t(done),
                               path: file.path)
                done += step
            }
        }
    }

    private func forEachPart(of range: AddressRange, _ body: (RegionFile, AddressRange) throws -> Void) throws {
        for file in overlapping(files, range) {
            let part = AddressRange(start: max(range.start, file.range.start), end: min(range.end, file.range.end))
            try body(file, part)
            let first = Int((part.start - file.range.start) / pageSize)
            // A page already hashed was stored again: after the freeze its bytes
            // cannot differ, but the checksum must cover what the file holds.
            if first < file.hashed { file.restartHash() }
            file.held.set(first..<first + Int(part.pageCount))
        }
    }

    // MARK: - Finalize and checksums

    /// Finalize: `layout` is final and the pages of `clean` are the frozen
    /// source's. Every other page will be stored again, so only these stay
    /// held; from now on held pages are final and are hashed.
    func sourceFrozen(layout: [Region], clean: [AddressRange]) throws {
        try adopt(layout)
        var final = files.map { PageBitmap(count: $0.pageCount) }
        for range in clean {
            let touched = overlapping(files, range)
            for i in touched.indices {
                let file = files[i]
                let from = max(range.start, file.range.start)
                let to = min(range.end, file.range.end)
                let first = Int((from - file.range.start) / pageSize)
                final[i].set(first..<first + Int((to - from) / pageSize))
            }
        }
        for (file, final) in zip(files, final) {
            file.held = file.held.intersection(final)
            file.restartHash()
        }
        hashing = true
    }

    /// Hashes up to `hashStepBytes` of held pages, in address order, of the
    /// first region that has some unhashed. Returns false when none can advance.
    func hashStep() throws -> Bool {
        guard hashing else { return false }
        for file in files where file.hashed < file.pageCount && file.held[file.hashed] {
            let maxPages = Self.hashStepBytes / Int(pageSize)
            let end = min(file.held.first(false, from: file.hashed), file.hashed + maxPages)
            let count = (end - file.hashed) * Int(pageSize)
            try readFully(file.fd, buffer.baseAddress!, count, at: off_t(file.hashed) * off_t(pageSize), path: file.path)
            file.hasher.update(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            pagesHashed += end - file.hashed
            file.hashed = end
            return true
        }
        return false
    }

    /// Every migrated region of the final `layout`, complete and hashed, moved
    /// to its manifest name: the manifest entries, in layout order.
    func finish(layout: [Region]) throws -> [ManifestRegion] {
        try adopt(layout)
        for file in files {
            let missing = file.held.first(false, from: 0)
            if missing < file.pageCount {
                throw MigrationError.image(
                    "page 0x\(String(file.range.start + UInt64(missing) * pageSize, radix: 16)) of region \(file.range) was never received; the image is incomplete")
            }
        }
        // Whatever was not hashed yet (all of it, if Finalize was not reported).
        hashing = true
        while try hashStep() {}
        var byStart: [UInt64: RegionFile] = [:]
        for file in files { byStart[file.range.start] = file }
        var entries: [ManifestRegion] = []
        for (index, region) in layout.enumerated() {
            var entry = ManifestRegion(
                start: region.start, end: region.end, prot: region.permissions, offset: region.offset,
                device: region.device, inode: region.inode, name: region.name, kind: region.kind.rawValue,
                file: nil, blake2b: nil)
            if region.isHugetlb { entry.pageSize = region.pageSize }
            if region.kind == .migrate {
                let name = String(format: "regions/%04d-%llx.bin", index, region.start)
                let path = (directory as NSString).deletingLastPathComponent + "/" + name
                if let file = byStart[region.start], file.range == region.range {
                    guard rename(file.path, path) == 0 else {
                        throw MigrationError.image("cannot name \(path): \(SystemError(operation: "rename", target: file.path, errno: errno))")
                    }
                    file.path = path
                    entry.blake2b = file.finishHash()
                } else {
                    // An empty region: no file was kept for it.
                    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
                    guard fd >= 0 else {
                        throw MigrationError.image("cannot create \(path): \(SystemError(operation: "open", target: path, errno: errno))")
                    }
                    close(fd)
                    entry.blake2b = imageChecksum(UnsafeRawBufferPointer(start: nil, count: 0))
                }
                entry.file = name
            }
            entries.append(entry)
        }
        files = []
        return entries
    }

    // MARK: - Constants Swift's Glibc module does not declare (they sit behind _GNU_SOURCE)

    /// lseek whences of Linux (include/uapi/linux/fs.h).
    private static let seekData: Int32 = 3
    private static let seekHole: Int32 = 4
}
