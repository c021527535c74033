// Reads and classifies the memory layout of a process from /proc/PID/maps.
//
// Why: the seeder must know which mappings hold state that exists nowhere else
// (and must be copied), which are backed by files the destination also has
// (recorded only), and which belong to the kernel or to a device (skipped).
// Kernel: any Linux; the `[vvar_vclock]` name appears from 6.12 on.
// Capability: reading another user's maps needs PTRACE_MODE_READ on the
// target (same user, or root / CAP_SYS_PTRACE). Telling hugetlb memory
// apart through /proc/PID/map_files needs CAP_SYS_ADMIN (or
// CAP_CHECKPOINT_RESTORE); without it /proc/PID/smaps answers, more slowly.
//
// The whole file is read with a few large read(2) calls (the kernel's
// seq_file fills the caller's buffer as far as it can; a walk torn by a
// mapping that changed meanwhile is read again, see `read`) and parsed byte
// by byte without building a String per field except for the three text
// fields each Region keeps.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit

/// An error reading a process's memory map. Each message says what failed,
/// on which pid, and what to do.
public enum ProcessMapsError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The process does not exist (or exited while we read its maps).
    case noSuchProcess(pid: Int32)
    /// We lack the ptrace-read right over the process.
    case permissionDenied(pid: Int32)
    /// Some other failure of open(2) or read(2).
    case readFailed(pid: Int32, errno: Int32)
    /// A line we could not parse (would mean a kernel format we do not know).
    case malformedLine(pid: Int32, line: String)

    public var description: String {
        switch self {
        case .noSuchProcess(let pid):
            return "cannot read the memory map of pid \(pid): no such process (check the pid; the process may have exited)"
        case .permissionDenied(let pid):
            return "cannot read the memory map of pid \(pid): permission denied (run as root or as the process's user with CAP_SYS_PTRACE)"
        case .readFailed(let pid, let errno):
            return "cannot read /proc/\(pid)/maps: \(SystemError.text(errno))"
        case .malformedLine(let pid, let line):
            return "cannot parse a line of /proc/\(pid)/maps: \"\(line)\" (unknown kernel format; please report it)"
        }
    }
}

public enum ProcessMaps {
    /// Reads `/proc/<pid>/maps` and classifies every mapping.
    ///
    /// Classification (why each choice is made):
    /// - **migrate**: private anonymous memory of any readable protection
    ///   (heap, stack, `[anon:name]`, plain anonymous; read-only anonymous
    ///   memory has no other copy either), writable private file mappings
    ///   (`.data`, `.bss`, copy-on-write pages differ from the file), and
    ///   shared memory with no file the destination could have: `/dev/zero`
    ///   and `[anon_shmem:…]` shared anonymous mappings, `/memfd:…`,
    ///   `/SYSV…` (System V shm) and `/dev/shm/…` (POSIX shm).
    /// - **recordOnly**: read-only and executable private file mappings
    ///   (text, rodata; path + offset are enough), shared mappings of regular
    ///   files, writable or not (their contents live in the file, which the
    ///   destination must have: as CRIU does), and `PROT_NONE` mappings
    ///   (guard pages and reserved address space: layout only, no readable contents).
    /// - **skip**: `[vvar]`, `[vvar_vclock]`, `[vsyscall]`, `[uprobes]`, other
    ///   bracketed kernel names, `anon_inode:` mappings, the AIO ring
    ///   (`/[aio]`, the kernel's completion queue), and device files under
    ///   `/dev/` other than `/dev/zero` and `/dev/shm/`. `[vdso]` is skipped too:
    ///   the kernel maps its own vDSO into every process and its code must
    ///   match the destination kernel, so copying the source's would be wrong.
    ///
    /// Known limit: RELRO pages (`r--p` file mappings that the loader wrote
    /// before making them read-only) are classified record-only by this rule.
    ///
    /// Hugetlb memory (`MAP_HUGETLB`, `SHM_HUGETLB`, `MFD_HUGETLB`, files on
    /// hugetlbfs) is classified like the shmem or file mapping it looks like,
    /// and gets its page size in `Region.pageSize` (see `hugePageSizes`).
    ///
    /// The layout returned is sorted and without overlaps. The kernel does
    /// not promise one consistent walk: 6.18 walks the maps without holding
    /// the mmap lock across the walk, and a mapping that changes meanwhile
    /// can appear twice, as it was and as it is (a heap whose break moves
    /// in a loop: 1 read in 100). Such a walk is read again; should
    /// `walkAttempts` walks all be torn, the last is made consistent
    /// (`consistent`), and the next read of a running process corrects it.
    public static func read(pid: Int32) throws -> [Region] {
        var regions: [Region] = []
        for attempt in 1...walkAttempts {
            regions = try parse(try readFile(pid: pid, file: "maps"), pid: pid)
            if isConsistent(regions) { break }
            if attempt == walkAttempts { regions = consistent(regions) }
        }
        try findHugePages(in: &regions, pid: pid)
        return regions
    }

    /// Walks of /proc/PID/maps tried before a torn one is repaired.
    static let walkAttempts = 8

    /// Whether `regions` is sorted, with no empty region and no overlap.
    static func isConsistent(_ regions: [Region]) -> Bool {
        var previousEnd: UInt64 = 0
        for region in regions {
            guard region.start >= previousEnd, region.start < region.end else { return false }
            previousEnd = region.end
        }
        return true
    }

    /// A torn walk made sorted and without overlaps: a line that lies
    /// within the one before it is dropped; one that overlaps its end
    /// starts where it ends (file offset moved with it). The union of the
    /// addresses is kept, so no memory goes untracked.
    static func consistent(_ regions: [Region]) -> [Region] {
        var result: [Region] = []
        // By start, the longer first: a shorter copy of a line is then dropped whole.
        for var region in regions.filter({ $0.start < $0.end }).sorted(by: { $0.start != $1.start ? $0.start < $1.start : $0.end > $1.end }) {
            if let last = result.last, region.start < last.end {
                guard region.end > last.end else { continue }
                region.offset += last.end - region.start
                region.range = AddressRange(start: last.end, end: region.end)
            }
            result.append(region)
        }
        return result
    }

    // MARK: - Huge pages

    /// Sets `pageSize` of the hugetlb regions among `regions`.
    ///
    /// Every hugetlb mapping is a file on a hugetlbfs mount (the kernel's
    /// own, unnamed ones for `/anon_hugepage`, `/SYSV…` and `/memfd:…`), and
    /// the maps line of such a file shows a pseudo file system's device
    /// (major 0). For those candidates only, one statfs(2) per device of
    /// `/proc/PID/map_files/START-END` tells hugetlbfs (f_type) and its page
    /// size (f_bsize). That needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; without
    /// it, `/proc/PID/smaps` (`KernelPageSize`) answers, at the cost of a walk
    /// of the process's page tables, paid only when a candidate exists.
    static func findHugePages(in regions: inout [Region], pid: Int32) throws {
        var sizes: [String: UInt64] = [:]
        var smaps: [UInt64: UInt64]? = nil
        for index in regions.indices {
            let region = regions[index]
            guard region.kind != .skip, region.device.hasPrefix("00:"), region.name.hasPrefix("/") else { continue }
            if let known = sizes[region.device] {
                regions[index].pageSize = known
                continue
            }
            // Through a live thread when the leader has exited (its map_files is empty).
            let link = ThreadGroup.procDirectory(of: pid) + "/map_files/\(String(region.start, radix: 16))-\(String(region.end, radix: 16))"
            let found = ferry_hugetlbfs_page_size(link)
            if found >= 0 {
                let size = found > 0 ? UInt64(found) : FerrySystem.pageSize
                sizes[region.device] = size
                regions[index].pageSize = size
                continue
            }
            // Not allowed to follow map_files (or the mapping went away):
            // ask smaps, once per read.
            if smaps == nil { smaps = try kernelPageSizes(pid: pid) }
            regions[index].pageSize = smaps?[region.start] ?? FerrySystem.pageSize
        }
    }

    /// `KernelPageSize` of every mapping in `/proc/PID/smaps`, by start address.
    static func kernelPageSizes(pid: Int32) throws -> [UInt64: UInt64] {
        let text = try readFile(pid: pid, file: "smaps")
        var result: [UInt64: UInt64] = [:]
        var current: UInt64? = nil
        for line in text.split(separator: UInt8(ascii: "\n")) {
            if let dash = line.firstIndex(of: UInt8(ascii: "-")), line.first.map({ $0 != UInt8(ascii: "K") }) ?? false,
               let start = UInt64(String(decoding: line[line.startIndex..<dash], as: UTF8.self), radix: 16) {
                current = start
                continue
            }
            let prefix = Array("KernelPageSize:".utf8)
            guard let start = current, line.starts(with: prefix) else { continue }
            let digits = line.dropFirst(prefix.count).filter { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
            if let kib = UInt64(String(decoding: digits, as: UTF8.self)) { result[start] = kib * 1024 }
        }
        return result
    }

    /// Parses the text of a maps file. Exposed for tests of odd lines.
    public static func parse(_ text: [UInt8], pid: Int32) throws -> [Region] {
        var regions: [Region] = []
        regions.reserveCapacity(text.count / 80 + 1)
        var lineStart = 0
        let count = text.count
        try text.withUnsafeBufferPointer { buffer in
            while lineStart < count {
                var lineEnd = lineStart
                while lineEnd < count && buffer[lineEnd] != UInt8(ascii: "\n") { lineEnd += 1 }
                if lineEnd > lineStart {
                    guard let region = parseLine(buffer, lineStart, lineEnd) else {
                        let line = String(decoding: UnsafeBufferPointer(rebasing: buffer[lineStart..<lineEnd]), as: UTF8.self)
                        throw ProcessMapsError.malformedLine(pid: pid, line: line)
                    }
                    regions.append(region)
                }
                lineStart = lineEnd + 1
            }
        }
        return regions
    }

    /// Classifies one mapping from its permissions, shared flag, name and inode.
    public static func classify(permissions: String, name: String, inode: UInt64) -> RegionKind {
        let perms = Array(permissions.utf8)
        guard perms.count == 4 else { return .skip }
        let readable = perms[0] == UInt8(ascii: "r")
        let writable = perms[1] == UInt8(ascii: "w")
        let executable = perms[2] == UInt8(ascii: "x")
        let shared = perms[3] == UInt8(ascii: "s")
        let path = name.hasSuffix(deletedSuffix) ? String(name.dropLast(deletedSuffix.count)) : name

        if path.hasPrefix("[") {
            // Pseudo-names. Anonymous ones behave like plain anonymous memory.
            if path == "[heap]" || path == "[stack]" || path.hasPrefix("[stack:")
                || path.hasPrefix("[anon:") || path.hasPrefix("[anon_shmem:") {
                return anonymous(readable: readable || writable || executable, shared: shared)
            }
            // [vvar], [vvar_vclock], [vsyscall], [vdso], [uprobes] and any
            // future kernel-owned mapping: the destination kernel provides its own.
            return .skip
        }
        if path.isEmpty {
            // No name and no inode: anonymous. (A nameless mapping with an
            // inode would be a file we cannot name; treat it as a file.)
            return inode == 0 ? anonymous(readable: readable || writable || executable, shared: shared)
                              : fileBacked(writable: writable, readable: readable)
        }
        if path.hasPrefix("anon_inode:") { return .skip }
        // The ring of an AIO context (io_setup): the kernel owns it and its
        // head and tail index the kernel's own completion queue. Copying it
        // means nothing without that context; whoever recreates the context
        // (CRIU does) recreates the ring.
        if path == "/[aio]" { return .skip }
        if path.hasPrefix("/dev/") {
            if path == "/dev/zero" {
                // Shared /dev/zero is the kernel's name for shared anonymous memory.
                return anonymous(readable: readable || writable || executable, shared: shared)
            }
            if path.hasPrefix("/dev/shm/") {
                return shared ? (readable || writable ? .migrate : .recordOnly) : fileBacked(writable: writable, readable: readable)
            }
            return .skip // a device: its memory belongs to the driver
        }
        if path.hasPrefix("/memfd:") || path.hasPrefix("/SYSV") {
            // shmem with no name the destination could open.
            return (readable || writable) ? .migrate : .recordOnly
        }
        if shared {
            // Writes go to the file itself: the file, not our copy, is the truth.
            return .recordOnly
        }
        return fileBacked(writable: writable, readable: readable)
    }

    static let deletedSuffix = " (deleted)"

    private static func anonymous(readable: Bool, shared: Bool) -> RegionKind {
        // PROT_NONE anonymous memory is reserved address space or a guard
        // page: copying it is impossible (process_vm_readv refuses) and pointless.
        readable ? .migrate : .recordOnly
    }

    private static func fileBacked(writable: Bool, readable: Bool) -> RegionKind {
        writable ? .migrate : .recordOnly
    }

    // MARK: - Reading

    /// Initial read size: a process with a few thousand mappings fits.
    private static let initialReadSize = 256 * 1024

    private static func readFile(pid: Int32, file: String) throws -> [UInt8] {
        // Through a live thread when the leader has exited: its own files read empty.
        let fd = ThreadGroup.openProcFile(file, of: pid, flags: O_RDONLY).fd
        if fd < 0 { throw mapError(pid: pid, errno: errno) }
        defer { close(fd) }
        var capacity = initialReadSize
        while true {
            var failure: Int32 = 0
            let bytes = [UInt8](unsafeUninitializedCapacity: capacity) { buffer, count in
                var used = 0
                while used < buffer.count {
                    // SAFETY: the destination is the uninitialized tail of
                    // `buffer`, `buffer.count - used` bytes; only the bytes
                    // read(2) wrote are counted as initialized.
                    let n: Int
                    do {
                        n = try checkedCall("read", on: "/proc/\(pid)/\(file)") {
                            Glibc.read(fd, buffer.baseAddress! + used, buffer.count - used)
                        }
                    } catch let error as SystemError {
                        failure = error.errno
                        break
                    } catch {
                        failure = EIO
                        break
                    }
                    if n == 0 { break }
                    used += n
                }
                count = used
            }
            if failure != 0 { throw mapError(pid: pid, errno: failure) }
            if bytes.count < capacity {
                // A process that exited between open and read yields an empty file.
                if bytes.isEmpty && kill(pid, 0) != 0 && errno == ESRCH {
                    throw ProcessMapsError.noSuchProcess(pid: pid)
                }
                return bytes
            }
            // Larger than the buffer: read it again from the start in one go,
            // so the result is one walk of the kernel's list, not two halves.
            capacity *= 4
            if lseek(fd, 0, SEEK_SET) != 0 { throw mapError(pid: pid, errno: errno) }
        }
    }

    private static func mapError(pid: Int32, errno error: Int32) -> ProcessMapsError {
        switch error {
        case ENOENT, ESRCH: return .noSuchProcess(pid: pid)
        case EACCES, EPERM: return .permissionDenied(pid: pid)
        default: return .readFailed(pid: pid, errno: error)
        }
    }

    // MARK: - Parsing

    /// Parses `start-end perms offset dev inode [name]`. Returns nil when malformed.
    private static func parseLine(_ b: UnsafeBufferPointer<UInt8>, _ from: Int, _ to: Int) -> Region? {
        var i = from
        guard let start = hex(b, &i, to), i < to, b[i] == UInt8(ascii: "-") else { return nil }
        i += 1
        guard let end = hex(b, &i, to), start <= end, skipSpaces(b, &i, to) else { return nil }
        let permStart = i
        while i < to && b[i] != UInt8(ascii: " ") { i += 1 }
        guard i - permStart == 4 else { return nil }
        let permissions = String(decoding: UnsafeBufferPointer(rebasing: b[permStart..<i]), as: UTF8.self)
        guard skipSpaces(b, &i, to), let offset = hex(b, &i, to), skipSpaces(b, &i, to) else { return nil }
        let devStart = i
        while i < to && b[i] != UInt8(ascii: " ") { i += 1 }
        guard i > devStart else { return nil }
        let device = String(decoding: UnsafeBufferPointer(rebasing: b[devStart..<i]), as: UTF8.self)
        guard skipSpaces(b, &i, to), let inode = decimal(b, &i, to) else { return nil }
        // The name starts after the padding; everything to the end of the
        // line belongs to it (paths may contain spaces, the kernel escapes '\n').
        while i < to && b[i] == UInt8(ascii: " ") { i += 1 }
        let name = i < to ? String(decoding: UnsafeBufferPointer(rebasing: b[i..<to]), as: UTF8.self) : ""
        let kind = classify(permissions: permissions, name: name, inode: inode)
        return Region(range: AddressRange(start: start, end: end), permissions: permissions,
                      offset: offset, device: device, inode: inode, name: name, kind: kind)
    }

    @inline(__always)
    private static func skipSpaces(_ b: UnsafeBufferPointer<UInt8>, _ i: inout Int, _ to: Int) -> Bool {
        guard i < to, b[i] == UInt8(ascii: " ") else { return false }
        while i < to && b[i] == UInt8(ascii: " ") { i += 1 }
        return i < to
    }

    @inline(__always)
    private static func hex(_ b: UnsafeBufferPointer<UInt8>, _ i: inout Int, _ to: Int) -> UInt64? {
        var value: UInt64 = 0
        let first = i
        while i < to {
            let c = b[i]
            let digit: UInt64
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt64(c &- UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt64(c &- UInt8(ascii: "a") &+ 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt64(c &- UInt8(ascii: "A") &+ 10)
            default:
                return i > first ? value : nil
            }
            guard i - first < 16 else { return nil }
            value = value << 4 | digit
            i += 1
        }
        return i > first ? value : nil
    }

    @inline(__always)
    private static func decimal(_ b: UnsafeBufferPointer<UInt8>, _ i: inout Int, _ to: Int) -> UInt64? {
        var value: UInt64 = 0
        let first = i
        while i < to, b[i] >= UInt8(ascii: "0"), b[i] <= UInt8(ascii: "9") {
            let (m, o1) = value.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(b[i] &- UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            value = s
            i += 1
        }
        return i > first ? value : nil
    }
}

extension Region {
    /// The name without the kernel's " (deleted)" suffix.
    public var path: String {
        name.hasSuffix(ProcessMaps.deletedSuffix) ? String(name.dropLast(ProcessMaps.deletedSuffix.count)) : name
    }

    /// True when the backing file was unlinked (memfd, SysV shm, shared
    /// anonymous memory and truly deleted files all look like this).
    public var isDeleted: Bool { name.hasSuffix(ProcessMaps.deletedSuffix) }

    /// True for memory with no backing file (heap, stack, anonymous, shared
    /// anonymous via /dev/zero or `[anon_shmem:]`).
    public var isAnonymous: Bool {
        let p = path
        return p.isEmpty || p == "[heap]" || p == "[stack]" || p.hasPrefix("[stack:")
            || p.hasPrefix("[anon:") || p.hasPrefix("[anon_shmem:") || (p == "/dev/zero" && isShared)
    }
}
