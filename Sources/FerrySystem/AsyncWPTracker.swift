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
// MADV_DONTNEED on anonymous memory drops the page *and* its protection: the
// page reads as zeros afterwards (its contents changed) but is neither
// written nor protected, so the first scan cannot see it. A second scan per
// range finds pages that are neither present nor swapped (nor a pte marker,
// which counts as swapped): exactly the zapped ones once the range has been
// protected, since protecting installs a marker in every empty slot. They are
// reported dirty and protected again (markers), so they are reported once.
// Kernels that already report an emptied slot as written in the first scan
// (6.18 does: its fast path treats "not write-protected" as written) make
// the second walk redundant; `zappedPagesNeedSecondScan` probes this once,
// on a page of our own, and the walk (about 0.7 ms per GiB) is skipped.
// Known limit: a private *file* page zapped the same way reverts to the
// file's contents and keeps a marker, so it is not reported.
#if canImport(Glibc)
import Glibc
#endif
internal import CFerryLinux
import FerryToolkit
import Synchronization

/// The uffd descriptor is owned by `Userfaultfd` (its own lock); the pagemap
/// descriptor is closed once, under its `Mutex`, which scans hold.
final class AsyncWPTracker: DirtyTracker {
    let kind = TrackerKind.async
    private let uffd: Userfaultfd
    private let pid: Int32
    /// /proc/PID/pagemap, -1 once closed.
    private let pagemap: Mutex<Int32>
    /// The hugetlb ranges registered, so protection requests are cut and aligned to their pages.
    private let hugePages = Mutex(HugePageMap())

    /// page_region entries per PAGEMAP_SCAN call: 4096 x 24 bytes = 96 KiB,
    /// enough for a badly fragmented GiB in a few calls.
    static let regionsPerCall = 4096

    /// Whether `scan` walks each range a second time for zapped pages.
    private let zapScan: Bool

    init(uffd: Userfaultfd, pid: Int32, zapScan: Bool = AsyncWPTracker.zappedPagesNeedSecondScan) throws {
        self.uffd = uffd
        self.pid = pid
        self.zapScan = zapScan
        // Through a live thread when the leader has exited (ThreadGroup.swift).
        let fd = ThreadGroup.openProcFile("pagemap", of: pid, flags: O_RDONLY).fd
        if fd < 0 {
            throw SystemError(operation: "open /proc/\(pid)/pagemap", target: "pid \(pid)", errno: errno,
                              hint: "run as root or grant CAP_SYS_PTRACE")
        }
        pagemap = Mutex(fd)
    }

    deinit { close() }

    func close() {
        closePagemap()
        uffd.close()
    }

    func track(_ range: AddressRange, pageSize: UInt64) throws {
        try uffd.register(range)
        try uffd.writeProtect(range, protect: true)
        hugePages.withLock { $0.add(range, size: pageSize) }
    }

    func rearm(_ ranges: [AddressRange]) throws {
        let map = hugePages.withLock { $0 }
        for range in map.split(ranges) {
            do { try uffd.writeProtect(range, protect: true) } catch let error as SystemError where error.errno == ENOENT {
                // Some mapping in the range is not registered (replaced or
                // unmapped meanwhile). The kernel protected the mappings
                // before it and stopped: protect the rest page by page.
                // Pages left unprotected read as written to every scan, and
                // a replaced mapping is found by the scan: nothing is missed.
                for page in map.pages(of: range) {
                    try? uffd.writeProtect(page, protect: true)
                }
            }
        }
    }

    func untrack(_ range: AddressRange) throws {
        try uffd.unregister(range)
        hugePages.withLock { $0.remove(range) }
    }

    func scan(_ ranges: [AddressRange], rearm: Bool) throws -> DirtyScan {
        try scan(ranges, capacity: Self.regionsPerCall, rearm: rearm)
    }

    /// `scan` with a chosen vector size (tests use small ones).
    func scan(_ ranges: [AddressRange], capacity: Int, rearm: Bool = true) throws -> DirtyScan {
        var result = DirtyScan()
        // SAFETY: owned by this call, deallocated on return; the kernel writes
        // at most `capacity` entries into it (vec_len).
        let vec = UnsafeMutablePointer<page_region>.allocate(capacity: capacity)
        defer { vec.deallocate() }
        try pagemap.withLock { pagemap in
            guard pagemap >= 0 else {
                throw SystemError(operation: "PAGEMAP_SCAN", target: "pid \(pid)", errno: EBADF, hint: "the tracker was stopped")
            }
            for range in ranges {
                if try !scan(range, pagemap: pagemap, vec: vec, capacity: capacity, into: &result.dirty, rearm: rearm) {
                    result.lost.append(range)
                    continue
                }
                guard zapScan else { continue }
                var zapped: [AddressRange] = []
                if try !scan(range, pagemap: pagemap, vec: vec, capacity: capacity, into: &zapped, zapped: true) {
                    result.lost.append(range)
                    continue
                }
                // Reported first, protected second: a write in between is in
                // the copy the caller makes after this scan. Without rearm
                // they stay empty and reported until read.
                let map = hugePages.withLock { $0 }
                for piece in map.split(zapped) where rearm {
                    do { try uffd.writeProtect(piece, protect: true) } catch let error as SystemError where error.errno == ENOENT {
                        continue
                    }
                }
                result.dirty += zapped
            }
        }
        result.dirty = Ranges.merge(result.dirty)
        return result
    }

    /// Scans one registered range for written pages (re-protecting them when
    /// `rearm`: the same page-table walk, so no write falls in between), or
    /// for empty page slots when `zapped`; false when part of the range is not registered any more.
    /// `pagemap` is the open descriptor, lent by the caller holding its lock.
    func scan(_ range: AddressRange, pagemap: Int32, vec: UnsafeMutablePointer<page_region>, capacity: Int,
              into dirty: inout [AddressRange], zapped: Bool = false, rearm: Bool = true) throws -> Bool {
        var start = range.start
        while start < range.end {
            var arg = pm_scan_arg()
            arg.size = UInt64(MemoryLayout<pm_scan_arg>.size)
            arg.flags = (rearm ? ferry_pm_scan_wp_matching() : 0) | ferry_pm_scan_check_wpasync()
            arg.start = start
            arg.end = range.end
            arg.vec = UInt64(UInt(bitPattern: vec))
            arg.vec_len = UInt64(capacity)
            if zapped {
                // Neither present nor swapped (nor marked): inverted, both bits required.
                let empty = ferry_page_is_present() | ferry_page_is_swapped()
                arg.flags = ferry_pm_scan_check_wpasync()
                arg.category_inverted = empty
                arg.category_mask = empty
                arg.return_mask = empty
            } else {
                arg.category_mask = ferry_page_is_written()
                arg.return_mask = ferry_page_is_written()
            }
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

    /// Runs only the zapped-page walk over `range` (for tests of the query itself).
    func zappedOnly(_ range: AddressRange) throws -> [AddressRange] {
        // SAFETY: as in `scan(_:capacity:)`, with 16 entries.
        let vec = UnsafeMutablePointer<page_region>.allocate(capacity: 16)
        defer { vec.deallocate() }
        var found: [AddressRange] = []
        _ = try pagemap.withLock { pagemap in try scan(range, pagemap: pagemap, vec: vec, capacity: 16, into: &found, zapped: true) }
        return found
    }

    /// True unless this kernel's written-page scan is seen to report a page
    /// emptied by MADV_DONTNEED: probed once per process on a private page of
    /// our own, tracked by an async uffd of our own. Any failure of the probe
    /// keeps the (always correct) second scan.
    static let zappedPagesNeedSecondScan: Bool = {
        guard let uffd = try? Userfaultfd.forOwnProcess() else { return true }
        defer { uffd.close() }
        guard (try? uffd.enable([.wpAsync, .wpUnpopulated])) != nil else { return true }
        let length = Int(pageSize)
        guard let page = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              page != MAP_FAILED else { return true }
        defer { munmap(page, length) }
        let address = UInt64(UInt(bitPattern: page))
        let range = AddressRange(start: address, end: address + pageSize)
        // SAFETY: `page` is a private mapping of one page that only this probe uses.
        page.storeBytes(of: 1, as: UInt8.self)
        guard let probe = try? AsyncWPTracker(uffd: uffd, pid: getpid(), zapScan: false) else { return true }
        defer { probe.closePagemap() }
        guard (try? probe.track(range)) != nil, (try? probe.scan([range]))?.dirty.isEmpty == true else { return true }
        madvise(page, length, MADV_DONTNEED)
        guard let scan = try? probe.scan([range]) else { return true }
        return scan.dirty != [range]
    }()

    /// Closes pagemap only (the probe's uffd is closed by its owner).
    func closePagemap() {
        pagemap.withLock { pagemap in
            if pagemap >= 0 { Glibc.close(pagemap); pagemap = -1 }
        }
    }
}
