// The last-resort tracker: soft-dirty bits.
//
// Why: kernels built with CONFIG_MEM_SOFT_DIRTY mark every written page in
// bit 55 of its /proc/PID/pagemap entry until "4" is written to
// /proc/PID/clear_refs. It needs no userfaultfd, but the reset is for the
// whole process, so a page cannot be re-armed when it is read (such pages
// stay dirty until the next scan: conservative), and a write that lands
// between reading pagemap and the reset is lost unless the process is
// frozen during the scan. Use it only when neither uffd tracker can run.
// Kernel: CONFIG_MEM_SOFT_DIRTY (x86_64, arm64 since 6.x, most distributions;
// not the kernel of our machines). Capability: PTRACE_MODE_ATTACH for clear_refs.
#if canImport(Glibc)
import Glibc
#endif
import FerryToolkit
import Synchronization

/// `pid` is immutable; `cleared` (whether clear_refs was written once) lives
/// in a `Mutex`, which also serializes scans; file access happens through
/// descriptors opened and closed within each call.
final class SoftDirtyTracker: DirtyTracker {
    let kind = TrackerKind.softDirty
    private let pid: Int32
    private let cleared = Mutex(false)

    /// Bit 55 of a pagemap entry: the page was written since the last clear.
    static let softDirtyBit: UInt64 = 1 << 55

    init(pid: Int32) throws {
        guard Self.kernelSupportsSoftDirty() else { throw AttachError.softDirtyUnsupported(pid: pid) }
        self.pid = pid
    }

    /// True when this kernel reports soft-dirty bits: a page we map and write
    /// is soft-dirty (new mappings always are), so bit 55 must be set for it.
    /// Without CONFIG_MEM_SOFT_DIRTY the bit is never set.
    static func kernelSupportsSoftDirty() -> Bool {
        guard let page = mmap(nil, Int(pageSize), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              page != MAP_FAILED else { return false }
        defer { munmap(page, Int(pageSize)) }
        // SAFETY: `page` is a fresh private mapping of one page that we own.
        page.storeBytes(of: 1, as: UInt8.self)
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var entry: UInt64 = 0
        let offset = off_t(UInt64(UInt(bitPattern: page)) / pageSize * 8)
        // SAFETY: reads exactly the 8 bytes of `entry`.
        guard pread(fd, &entry, 8, offset) == 8 else { return false }
        return entry & softDirtyBit != 0
    }

    func track(_ range: AddressRange, pageSize: UInt64) throws {
        // The kernel keeps no soft-dirty bit for hugetlb pages: such a
        // region is refused, so its owner sends it in full after the freeze.
        if pageSize > FerrySystem.pageSize {
            throw SystemError(operation: "soft-dirty tracking", target: "pid \(pid) at \(range)", errno: EINVAL,
                              hint: "hugetlb pages carry no soft-dirty bit; the region is sent after the freeze")
        }
        // clear_refs resets the whole process: do it once, at the first range.
        // Ranges registered later are reported dirty in full by the owner.
        try cleared.withLock { cleared in
            if !cleared { try clearRefs(); cleared = true }
        }
    }

    func rearm(_ ranges: [AddressRange]) throws {
        // Not possible per range; the pages stay dirty until the next scan.
    }

    func untrack(_ range: AddressRange) throws {}

    func close() {}

    /// The reset is for the whole process, so every scan re-arms, whatever
    /// `rearm` says: each written page is still reported at least once.
    func scan(_ ranges: [AddressRange], rearm: Bool) throws -> DirtyScan {
        try cleared.withLock { _ in
            let fd = ThreadGroup.openProcFile("pagemap", of: pid, flags: O_RDONLY).fd
            if fd < 0 { throw SystemError(operation: "open /proc/\(pid)/pagemap", target: "pid \(pid)", errno: errno) }
            defer { Glibc.close(fd) }
            var pages: [UInt64] = []
            let batch = 512
            var entries = [UInt64](repeating: 0, count: batch)
            for range in ranges {
                var page = range.start / pageSize
                let last = range.end / pageSize
                while page < last {
                    let count = Int(min(UInt64(batch), last - page))
                    // SAFETY: count <= batch entries of 8 bytes each.
                    let got = entries.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count * 8, off_t(page * 8)) }
                    if got <= 0 { break }
                    for index in 0..<(got / 8) where entries[index] & Self.softDirtyBit != 0 {
                        pages.append(page + UInt64(index))
                    }
                    page += UInt64(got / 8)
                }
            }
            try clearRefs()
            return DirtyScan(dirty: Ranges.fromPages(pages))
        }
    }

    private func clearRefs() throws {
        let fd = ThreadGroup.openProcFile("clear_refs", of: pid, flags: O_WRONLY).fd
        if fd < 0 { throw SystemError(operation: "open /proc/\(pid)/clear_refs", target: "pid \(pid)", errno: errno) }
        defer { Glibc.close(fd) }
        var four: UInt8 = UInt8(ascii: "4")
        try checkedCall("write clear_refs", on: "pid \(pid)") { Glibc.write(fd, &four, 1) }
    }
}
