// The best tracker: asynchronous userfaultfd write-protection read back with
// the PAGEMAP_SCAN ioctl.
//
// Why: with UFFD_FEATURE_WP_ASYNC the kernel resolves a write fault on a
// protected page by itself (about 1 µs, no thread of ours involved) and only
// clears the page's uffd-wp bit. PAGEMAP_SCAN on /proc/PID/pagemap with
// PM_SCAN_WP_MATCHING then returns the pages whose bit is clear (written)
// and sets it again in the same page-table walk, so no write between
// "report" and "re-protect" can be lost. WP_ASYNC implies WP_UNPOPULATED:
// pages never touched are protected too (pte markers), so reading them does
// not make them look written.
// Kernel: 6.7+. Capability: PTRACE_MODE_READ on the target for pagemap.
//
// Known limits: MADV_DONTNEED on anonymous memory drops the protection with
// the page; the page reads as zeros afterwards but is not reported until it
// is written again. A private file page zapped the same way reverts to the
// file's contents without being reported.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux

/// `@unchecked Sendable` invariant: all stored properties are immutable; the
/// descriptors are owned by `Userfaultfd` (its own lock) and `pagemap`
/// (closed once, in `close()` under `closeLock`).
final class AsyncWPTracker: DirtyTracker, @unchecked Sendable {
    let kind = TrackerKind.async
    private let uffd: Userfaultfd
    private let pid: Int32
    private let closeLock = Lock()
    private var pagemap: Int32

    /// page_region entries per PAGEMAP_SCAN call: 4096 x 24 bytes = 96 KiB,
    /// enough for a badly fragmented GiB in a few calls.
    static let regionsPerCall = 4096

    init(uffd: Userfaultfd, pid: Int32) throws {
        self.uffd = uffd
        self.pid = pid
        let fd = open("/proc/\(pid)/pagemap", O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            throw SystemError(operation: "open /proc/\(pid)/pagemap", target: "pid \(pid)", errno: errno,
                              hint: "run as root or grant CAP_SYS_PTRACE")
        }
        pagemap = fd
    }

    deinit { close() }

    func close() {
        closeLock.withLock {
            if pagemap >= 0 { _ = Glibc.close(pagemap); pagemap = -1 }
        }
        uffd.close()
    }

    func track(_ range: AddressRange) throws {
        try uffd.register(range)
        try uffd.writeProtect(range, protect: true)
    }

    func rearm(_ ranges: [AddressRange]) throws {
        for range in ranges { try uffd.writeProtect(range, protect: true) }
    }

    func untrack(_ range: AddressRange) throws {
        try uffd.unregister(range)
    }

    func scan(_ ranges: [AddressRange]) throws -> DirtyScan {
        var result = DirtyScan()
        let capacity = Self.regionsPerCall
        let vec = UnsafeMutablePointer<page_region>.allocate(capacity: capacity)
        defer { vec.deallocate() }
        try closeLock.withLock {
            guard pagemap >= 0 else {
                throw SystemError(operation: "PAGEMAP_SCAN", target: "pid \(pid)", errno: EBADF, hint: "the tracker was stopped")
            }
            for range in ranges {
                if try !scan(range, vec: vec, capacity: capacity, into: &result.dirty) {
                    result.lost.append(range)
                }
            }
        }
        result.dirty = Ranges.merge(result.dirty)
        return result
    }

    /// Scans one registered range; false when part of it is not registered any more.
    private func scan(_ range: AddressRange, vec: UnsafeMutablePointer<page_region>, capacity: Int,
                      into dirty: inout [AddressRange]) throws -> Bool {
        var start = range.start
        while start < range.end {
            var arg = pm_scan_arg()
            arg.size = UInt64(MemoryLayout<pm_scan_arg>.size)
            arg.flags = ferry_pm_scan_wp_matching() | ferry_pm_scan_check_wpasync()
            arg.start = start
            arg.end = range.end
            arg.vec = UInt64(UInt(bitPattern: vec))
            arg.vec_len = UInt64(capacity)
            arg.category_mask = ferry_page_is_written()
            arg.return_mask = ferry_page_is_written()
            let count: Int
            do {
                // SAFETY: `vec` holds `capacity` page_region entries, the length passed in vec_len.
                count = try checkedCall("PAGEMAP_SCAN", on: "pid \(pid) at \(range)") { ferry_pagemap_scan(pagemap, &arg) }
            } catch let error as SystemError where error.errno == EPERM {
                // PM_SCAN_CHECK_WPASYNC met a mapping that is not registered:
                // it was replaced since we registered it.
                return false
            }
            for index in 0..<count {
                let region = vec[index]
                dirty.append(AddressRange(start: region.start, end: region.end))
            }
            // A full vector means the walk stopped early at walk_end; a short
            // one means the walk finished, whatever walk_end says (it can stop
            // short of `end` after the last match).
            guard count == capacity, arg.walk_end > start, arg.walk_end < range.end else { break }
            start = arg.walk_end
        }
        return true
    }
}
