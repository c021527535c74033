// Repairs a lazy dump in which CRIU wrote memory it should have left lazy
// (CRIU up to 4.2.1, a page-aligned stack pointer: Protocols/criu.md § 2),
// so the images stay small and the memory travels once, with Ferry.
import Foundation
import FerryToolkit
#if canImport(Glibc)
import Glibc
#endif

extension CriuDump {
    /// What `leaveLazy` changed in the images.
    public struct LazyRepair: Sendable, Equatable {
        /// Pages now flagged PE_LAZY that CRIU had written into pages-*.img.
        public let pages: UInt64
        /// Bytes dropped from pages-*.img.
        public let bytes: UInt64
    }

    /// Puts back in the lazy set the pages CRIU wrote into its images for no
    /// reason but a page-aligned stack pointer.
    ///
    /// CRIU's lazy dump keeps a thread's current stack page out of the lazy
    /// set (criu/mem.c, is_stack(), since 3.11 and still in 4.2.1) with the
    /// test `!((sp ^ vaddr) & ~PAGE_MASK)`: it compares the offsets within
    /// the page, not the pages, so it holds for *every* page as soon as one
    /// thread's stack pointer is page aligned, and for none otherwise. A
    /// thread whose stack is randomized (a main thread waiting in a system
    /// call) is aligned in 1 dump of 256; that dump writes all the process's
    /// memory into pages-*.img while the process is frozen, more than the
    /// images bundle takes (`CriuImages.maxBundleBytes`) for a 1 GiB process,
    /// and pages Ferry moves anyway travel twice.
    ///
    /// This makes the images what is_stack() meant: each page present in
    /// pages-*.img that lies in a VMA CRIU may restore lazily
    /// (vma_entry_can_be_lazy(): private anonymous, not MAP_LOCKED, not
    /// hugetlb, not vDSO, vvar or vsyscall), inside `servable` (the memory
    /// Ferry migrates: the leecher serves it to CRIU's lazy-pages daemon) and
    /// not a thread's current stack page (the stack pointers of the x86-64
    /// core-*.img) is flagged PE_LAZY instead and its bytes dropped. Returns
    /// nil when every such page was lazy already (the usual case, and a
    /// CRIU whose is_stack() is fixed: nothing is written). Call it with the
    /// process frozen, before the images are packed.
    public func leaveLazy(servable: [(start: UInt64, end: UInt64)]) throws -> LazyRepair? {
        let names = try FileManager.default.contentsOfDirectory(atPath: images)
        var pages: UInt64 = 0
        var bytes: UInt64 = 0
        let stacks = try CriuImageRecords.stackPages(directory: images, names: names)
        for name in names.sorted() where name.hasPrefix("pagemap-") && name.hasSuffix(".img") && !name.hasPrefix("pagemap-shmem") {
            let id = name.dropFirst("pagemap-".count).dropLast(".img".count)
            guard UInt64(id) != nil, names.contains("mm-\(id).img") else { continue }
            let lazyable = try CriuImageRecords.lazyableVMAs(path: images + "/mm-\(id).img")
            let allowed = subtract(stacks, from: intersect(lazyable, servable.filter { $0.start < $0.end }.sorted { $0.start < $1.start }))
            guard !allowed.isEmpty, let repair = try relazy(pagemap: name, allowed: allowed) else { continue }
            pages += repair.pages
            bytes += repair.bytes
        }
        return pages == 0 ? nil : LazyRepair(pages: pages, bytes: bytes)
    }

    /// Rewrites one pagemap and its pages image; nil when nothing changed.
    private func relazy(pagemap name: String, allowed: [(start: UInt64, end: UInt64)]) throws -> LazyRepair? {
        let pagemapPath = images + "/" + name
        let original = [UInt8](try Data(contentsOf: URL(fileURLWithPath: pagemapPath)))
        let records = try CriuImageRecords.records(original, name: name)
        guard let head = records.first else { return nil }
        guard let pagesID = try CriuImageRecords.fields(head, name: name).first(where: { $0.number == 1 })?.value else {
            throw CriuError.badImages("\(name): a pagemap head without pages_id")
        }
        let pagesPath = images + "/pages-\(pagesID).img"
        let page = UInt64(CriuImageRecords.pageBytes)

        // The new entries, and the byte ranges of the old pages image to keep.
        var out = Array(original[0..<8])
        CriuImageRecords.appendRecord(Array(head), to: &out)
        var keep: [(offset: UInt64, length: UInt64)] = []
        var offset: UInt64 = 0 // of the entry's pages in the old pages image
        var lazied: UInt64 = 0
        for record in records.dropFirst() {
            let (start, n, flags) = try CriuImageRecords.pagemapEntry(record, name: name)
            let present = UInt32(truncatingIfNeeded: flags) & PagemapFlag.present != 0
            let lazy = UInt32(truncatingIfNeeded: flags) & PagemapFlag.lazy != 0
            guard present, !lazy else {
                CriuImageRecords.appendRecord(Array(record), to: &out)
                if present { offset += n * page }
                continue
            }
            // Split the entry where it enters or leaves the allowed ranges.
            let end = start + n * page
            var at = start
            for piece in split(start: start, end: end, by: allowed) {
                let pieceLength = piece.end - piece.start
                if piece.lazy {
                    CriuImageRecords.appendRecord(
                        CriuImageRecords.pagemapEntry(vaddr: piece.start, pages: pieceLength / page, flags: UInt64(PagemapFlag.lazy)),
                        to: &out)
                    lazied += pieceLength / page
                } else {
                    if piece.start == start && piece.end == end {
                        CriuImageRecords.appendRecord(Array(record), to: &out)
                    } else {
                        CriuImageRecords.appendRecord(
                            CriuImageRecords.pagemapEntry(vaddr: piece.start, pages: pieceLength / page, flags: flags), to: &out)
                    }
                    let from = offset + (piece.start - start)
                    if let last = keep.last, last.offset + last.length == from {
                        keep[keep.count - 1].length += pieceLength
                    } else {
                        keep.append((from, pieceLength))
                    }
                }
                at = piece.end
            }
            precondition(at == end)
            offset += n * page
        }
        guard lazied > 0 else { return nil }

        // Both new files first; then the pages image, then the pagemap, in
        // place, the old pages image restored if the second rename fails.
        let oldSize = (try FileManager.default.attributesOfItem(atPath: pagesPath)[.size] as? NSNumber)?.uint64Value ?? 0
        guard oldSize >= offset else {
            throw CriuError.badImages("pages-\(pagesID).img holds \(oldSize) bytes, \(name) describes \(offset)")
        }
        let newPages = pagesPath + ".lazy"
        let newPagemap = pagemapPath + ".lazy"
        defer {
            unlink(newPages)
            unlink(newPagemap)
        }
        try copyRanges(keep, from: pagesPath, to: newPages)
        try Data(out).write(to: URL(fileURLWithPath: newPagemap))
        let saved = pagesPath + ".cut"
        try checkedCall("rename", on: pagesPath) { rename(pagesPath, saved) }
        do {
            try checkedCall("rename", on: newPages) { rename(newPages, pagesPath) }
            try checkedCall("rename", on: newPagemap) { rename(newPagemap, pagemapPath) }
        } catch {
            unlink(pagesPath)
            rename(saved, pagesPath)
            throw error
        }
        unlink(saved)
        let kept = keep.reduce(UInt64(0)) { $0 + $1.length }
        return LazyRepair(pages: lazied, bytes: offset - kept)
    }

    /// Copies byte ranges of one file, in order, into a new one.
    private func copyRanges(_ ranges: [(offset: UInt64, length: UInt64)], from source: String, to destination: String) throws {
        let input = try checkedCall("open", on: source) { open(source, O_RDONLY | O_CLOEXEC) }
        defer { close(input) }
        let output = try checkedCall("open", on: destination) { open(destination, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600) }
        defer { close(output) }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        for range in ranges {
            var done: UInt64 = 0
            while done < range.length {
                let want = Int(min(UInt64(chunk), range.length - done))
                let got = try checkedCall("pread", on: source) { pread(input, buffer, want, off_t(range.offset + done)) }
                guard got > 0 else { throw CriuError.badImages("\(source) ends before byte \(range.offset + done)") }
                var written = 0
                while written < got {
                    written += try checkedCall("write", on: destination) { write(output, buffer + written, got - written) }
                }
                done += UInt64(got)
            }
        }
    }

    /// The parts of `a` inside `b` (each sorted, non-overlapping within itself).
    private func intersect(_ a: [(start: UInt64, end: UInt64)], _ b: [(start: UInt64, end: UInt64)]) -> [(start: UInt64, end: UInt64)] {
        var result: [(start: UInt64, end: UInt64)] = []
        for x in a {
            for y in b where y.start < x.end && x.start < y.end {
                let piece = (start: max(x.start, y.start), end: min(x.end, y.end))
                if let last = result.last, last.end == piece.start {
                    result[result.count - 1].end = piece.end
                } else if let last = result.last, last.end > piece.start {
                    result[result.count - 1].end = max(last.end, piece.end) // b overlapped itself
                } else {
                    result.append(piece)
                }
            }
        }
        return result
    }

    /// `ranges` (sorted) without the pages at `pages`.
    private func subtract(_ pages: Set<UInt64>, from ranges: [(start: UInt64, end: UInt64)]) -> [(start: UInt64, end: UInt64)] {
        let page = UInt64(CriuImageRecords.pageBytes)
        var result: [(start: UInt64, end: UInt64)] = []
        for range in ranges {
            var at = range.start
            for hole in pages.sorted() where hole >= range.start && hole < range.end {
                if hole > at { result.append((at, hole)) }
                at = max(at, hole + page)
            }
            if at < range.end { result.append((at, range.end)) }
        }
        return result
    }

    /// [start, end) cut into pieces inside (lazy) or outside the allowed ranges.
    private func split(start: UInt64, end: UInt64, by allowed: [(start: UInt64, end: UInt64)]) -> [(start: UInt64, end: UInt64, lazy: Bool)] {
        var pieces: [(start: UInt64, end: UInt64, lazy: Bool)] = []
        var at = start
        for range in allowed where range.end > at && range.start < end {
            if range.start > at {
                pieces.append((at, range.start, false))
                at = range.start
            }
            let stop = min(range.end, end)
            pieces.append((at, stop, true))
            at = stop
        }
        if at < end { pieces.append((at, end, false)) }
        return pieces
    }
}
