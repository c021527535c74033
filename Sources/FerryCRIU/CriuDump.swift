// The source's side: `criu dump --lazy-pages` of a process Ferry has
// pre-copied (Protocols/criu.md § 2). The dump writes every image but the
// private anonymous memory, runs our post-dump hook with the process frozen,
// and, once the hook says 0, serves the lazy memory from a page server that
// takes exactly one connection. Ferry never asks it for a page: its only
// connection is ours, made at the end to send PS_IOV_CLOSE, after which CRIU
// kills the process (hook 0) or resumes it (hook non-zero).
import Foundation
import FerryToolkit
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

public final class CriuDump: Sendable {
    public let criu: Criu
    public let pid: Int32
    public let directory: String
    public let images: String
    public let grace: Duration
    private let hook: PostDumpHook
    private let port: UInt16
    /// The running dump, once started; whether `end` ran.
    private let state = Mutex<(run: CriuRun?, finished: Bool)>((nil, false))

    /// Images and logs go under `workDirectory` (created).
    public init(criu: Criu, pid: Int32, workDirectory: String, grace: Duration) throws {
        self.criu = criu
        self.pid = pid
        self.grace = grace
        directory = workDirectory
        images = workDirectory + "/images"
        try FileManager.default.createDirectory(atPath: images, withIntermediateDirectories: true)
        hook = try PostDumpHook(in: workDirectory, limit: grace + Self.maxHold)
        port = try freeLoopbackPort()
    }

    public var log: String { directory + "/dump.log" }

    /// How long CRIU may hold the process after the dump for the leecher to
    /// restore it and fetch its memory (post-copy), beyond the grace period.
    public static let maxHold: Duration = .seconds(1800)

    /// Runs the dump until the post-dump hook reports every image written,
    /// the process frozen; at most the grace period. On failure the process
    /// runs on (CRIU resumed it) and the error carries CRIU's reason.
    /// Blocking: call it off the cooperative pool.
    public func dumpUntilFrozen() throws -> Duration {
        let began = ContinuousClock.now
        let run = try CriuRun(criu, "dump", ["-t", "\(pid)", "--lazy-pages", "--address", "127.0.0.1", "--port", "\(port)",
                                             "--action-script", hook.script],
                              directory: images, log: log, statusFD: true)
        state.withLock { $0.run = run }
        let deadline = began + grace + .seconds(30)
        while ContinuousClock.now < deadline {
            if hook.waitDumped(timeout: .milliseconds(50)) { return ContinuousClock.now - began }
            if !run.isRunning {
                try run.wait(timeout: .seconds(1))
                throw CriuError.failed(step: "dump", status: 0, log: log, tail: "it ended before its post-dump hook ran")
            }
        }
        end(resume: true)
        throw CriuError.timedOut(step: "dump", seconds: (ContinuousClock.now - began).inSeconds, log: log)
    }

    /// The images CRIU wrote, packed for the leecher.
    public func packedImages() throws -> [UInt8] { try CriuImages.pack(directory: images) }

    /// Ends the dump: `resume` false lets CRIU kill the process (the
    /// destination holds it now), true makes CRIU resume it. Then closes
    /// CRIU's page server with PS_IOV_CLOSE and waits for CRIU to exit, each
    /// bounded by the grace period. Blocking; safe to call more than once.
    @discardableResult
    public func end(resume: Bool) -> (any Error)? {
        let (first, started) = state.withLock { s in defer { s.finished = true }; return (!s.finished, s.run) }
        guard first, let run = started else { return nil }
        hook.answer(resume: resume)
        do {
            // The page server listens once the hook has returned (--status-fd).
            if run.waitReady(timeout: grace) { try closePageServer() }
            try run.wait(timeout: grace)
            return nil
        } catch CriuError.failed(_, let status, _, _) where resume && status == 1 {
            return nil // the hook's 1: CRIU resumed the process, as asked
        } catch {
            run.terminate()
            return error
        }
    }

    private func closePageServer() throws {
        let socket = try connectLoopback(port: port)
        defer { close(socket) }
        let header = PageServerHeader(command: .close).encoded(narrow: criu.hasNarrowPageServerHeader)
        try sendAll(socket, header)
        var status: Int32 = -1
        _ = withUnsafeMutableBytes(of: &status) { recv(socket, $0.baseAddress, 4, Int32(MSG_WAITALL)) }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort() throws -> UInt16 {
    let fd = try checkedCall("socket", on: "127.0.0.1") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
    defer { close(fd) }
    var address = loopback(port: 0)
    try checkedCall("bind", on: "127.0.0.1:0") {
        withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    try checkedCall("getsockname", on: "127.0.0.1") {
        withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    }
    return UInt16(bigEndian: address.sin_port)
}

func loopback(port: UInt16) -> sockaddr_in {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    address.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
    return address
}

func connectLoopback(port: UInt16) throws -> Int32 {
    let fd = try checkedCall("socket", on: "127.0.0.1:\(port)") { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
    var address = loopback(port: port)
    do {
        try checkedCall("connect", on: "CRIU's page server at 127.0.0.1:\(port)") {
            withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
    } catch {
        close(fd)
        throw error
    }
    return fd
}

func sendAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
    var sent = 0
    while sent < bytes.count {
        let n = try checkedCall("send", on: "the CRIU page-server connection") {
            send(fd, bytes.baseAddress! + sent, bytes.count - sent, Int32(MSG_NOSIGNAL))
        }
        sent += n
    }
}

func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws {
    try bytes.withUnsafeBytes { try sendAll(fd, $0) }
}

// MARK: - Pages CRIU should have left lazy

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
            var vaddr: UInt64?, flags: UInt64 = 0, compat: UInt64 = 0, count: UInt64?
            for field in try CriuImageRecords.fields(record, name: name) {
                switch field.number {
                case 1: vaddr = field.value
                case 2: compat = field.value
                case 4: flags = field.value
                case 5: count = field.value
                default: break
                }
            }
            guard let start = vaddr else { throw CriuError.badImages("\(name): an entry without vaddr") }
            let n = count ?? compat
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

/// CRIU's image files as `CriuDump.leaveLazy` reads and writes them: two
/// magic words, then records of a little-endian u32 size and a protobuf
/// message (images/pagemap.proto, mm.proto, vma.proto).
enum CriuImageRecords {
    static let pageBytes = 4096

    struct Field {
        let number: UInt64
        /// A varint's value (wire type 0); 0 for other types.
        let value: UInt64
        /// A length-delimited field's bytes (wire type 2).
        let bytes: ArraySlice<UInt8>
    }

    static func records(_ bytes: [UInt8], name: String) throws -> [ArraySlice<UInt8>] {
        guard bytes.count >= 8 else { throw CriuError.badImages("\(name) is cut short") }
        var cursor = 8
        var result: [ArraySlice<UInt8>] = []
        while cursor < bytes.count {
            guard bytes.count - cursor >= 4 else { throw CriuError.badImages("\(name) is cut short") }
            let size = Int(bytes[cursor..<cursor + 4].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            cursor += 4
            guard size <= bytes.count - cursor else { throw CriuError.badImages("\(name) is cut short") }
            result.append(bytes[cursor..<cursor + size])
            cursor += size
        }
        return result
    }

    static func fields(_ message: ArraySlice<UInt8>, name: String) throws -> [Field] {
        var result: [Field] = []
        var at = message.startIndex
        while at < message.endIndex {
            let (key, next) = try varint(message, at, name)
            at = next
            switch key & 7 {
            case 0:
                let (value, after) = try varint(message, at, name)
                result.append(Field(number: key >> 3, value: value, bytes: []))
                at = after
            case 1, 5:
                let size = key & 7 == 1 ? 8 : 4
                guard message.endIndex - at >= size else { throw CriuError.badImages("\(name): a field is cut short") }
                at += size
            case 2:
                let (length, after) = try varint(message, at, name)
                guard length <= UInt64(message.endIndex - after) else { throw CriuError.badImages("\(name): a field is cut short") }
                result.append(Field(number: key >> 3, value: 0, bytes: message[after..<after + Int(length)]))
                at = after + Int(length)
            default:
                throw CriuError.badImages("\(name): unexpected field type \(key & 7)")
            }
        }
        return result
    }

    static func varint(_ bytes: ArraySlice<UInt8>, _ start: Int, _ name: String) throws -> (UInt64, Int) {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var at = start
        while at < bytes.endIndex, shift < 64 {
            let byte = bytes[at]
            value |= UInt64(byte & 0x7F) << shift
            at += 1
            if byte & 0x80 == 0 { return (value, at) }
            shift += 7
        }
        throw CriuError.badImages("\(name): a malformed varint")
    }

    static func appendVarint(_ value: UInt64, to out: inout [UInt8]) {
        var v = value
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    static func appendRecord(_ message: [UInt8], to out: inout [UInt8]) {
        withUnsafeBytes(of: UInt32(message.count).littleEndian) { out += $0 }
        out += message
    }

    /// A pagemap_entry as CRIU writes one: vaddr, compat_nr_pages 0 (a
    /// required field), flags, nr_pages.
    static func pagemapEntry(vaddr: UInt64, pages: UInt64, flags: UInt64) -> [UInt8] {
        var out: [UInt8] = []
        out.append(1 << 3); appendVarint(vaddr, to: &out)
        out.append(2 << 3); appendVarint(0, to: &out)
        out.append(4 << 3); appendVarint(flags, to: &out)
        out.append(5 << 3); appendVarint(pages, to: &out)
        return out
    }

    /// mmap flags and VMA status bits of vma_entry_can_be_lazy()
    /// (criu/include/vma.h, image.h).
    static let mapPrivate: UInt64 = 0x02, mapAnonymous: UInt64 = 0x20, mapLocked: UInt64 = 0x2000, mapHugetlb: UInt64 = 0x40000
    static let areaVsyscall: UInt64 = 1 << 2, areaVdso: UInt64 = 1 << 3, areaVvar: UInt64 = 1 << 12

    /// The pages holding a thread's stack pointer, from every core-*.img of
    /// an x86-64 dump (core_entry.thread_info.gpregs.sp); none for another
    /// architecture.
    static func stackPages(directory: String, names: [String]) throws -> Set<UInt64> {
        var pages = Set<UInt64>()
        for name in names where name.hasPrefix("core-") && name.hasSuffix(".img") {
            let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name)))
            guard let core = try records(bytes, name: name).first else { continue }
            let fields = try fields(core, name: name)
            guard fields.first(where: { $0.number == 1 })?.value == 1, // mtype X86_64
                  let thread = fields.first(where: { $0.number == 2 }),
                  let regs = try self.fields(thread.bytes, name: name).first(where: { $0.number == 2 }),
                  let sp = try self.fields(regs.bytes, name: name).first(where: { $0.number == 20 })?.value else { continue }
            pages.insert(sp & ~UInt64(pageBytes - 1))
        }
        return pages
    }

    /// The VMAs of mm-ID.img whose pages CRIU may leave lazy, sorted.
    static func lazyableVMAs(path: String) throws -> [(start: UInt64, end: UInt64)] {
        let name = (path as NSString).lastPathComponent
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        guard let mm = try records(bytes, name: name).first else { throw CriuError.badImages("\(name) is empty") }
        var result: [(start: UInt64, end: UInt64)] = []
        for field in try fields(mm, name: name) where field.number == 14 {
            var start: UInt64 = 0, end: UInt64 = 0, flags: UInt64 = 0, status: UInt64 = 0
            for f in try fields(field.bytes, name: name) {
                switch f.number {
                case 1: start = f.value
                case 2: end = f.value
                case 6: flags = f.value
                case 7: status = f.value
                default: break
                }
            }
            guard flags & mapAnonymous != 0, flags & mapPrivate != 0, flags & (mapLocked | mapHugetlb) == 0,
                  status & (areaVsyscall | areaVdso | areaVvar) == 0, start < end else { continue }
            result.append((start, end))
        }
        return result.sorted { $0.start < $1.start }
    }
}
