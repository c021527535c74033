// Post-copy memory in huge pages (issue 15, class 2): a hugetlb area is
// mapped with MAP_HUGETLB of its page size and filled only in whole huge
// pages. Its 4 KiB pages are staged until the last one of a huge page has
// arrived; a touch anywhere in a huge page is reported once, at the huge
// page's start; zero pages (which hugetlb cannot take with UFFDIO_ZEROPAGE)
// are copied as zeros; and a failure poisons whole huge pages, which then
// raise SIGBUS, never read zeros. Before this, hugetlb areas could not be
// mapped at all (`MissingFaultMemory.Area` did not exist and live memory
// refused them).
import Testing
import Glibc
import Foundation
import Synchronization
import FerryTestSupport
@testable import FerrySystem

private let hugePage: UInt64 = 2 << 20
private let pagesPerHuge = Int(hugePage / pageSize)

/// Source bytes of the page at `address`: a function of the address.
private func sourcePage(_ address: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: Int(pageSize))
    var x = address &* 0x9E37_79B9_7F4A_7C15 | 1
    for i in stride(from: 0, to: bytes.count, by: 8) {
        x ^= x >> 29; x &*= 0xBF58_476D_1CE4_E5B9
        withUnsafeBytes(of: x) { bytes.replaceSubrange(i..<i + 8, with: $0) }
    }
    return bytes
}

private func sourceBytes(_ range: AddressRange) -> [UInt8] {
    var bytes: [UInt8] = []
    bytes.reserveCapacity(Int(range.length))
    for page in stride(from: range.start, to: range.end, by: Int(pageSize)) { bytes += sourcePage(page) }
    return bytes
}

/// `huge` huge pages at an address unlikely to be taken in the test process, 1 GiB aligned.
private func hugeArea(_ huge: Int, slot: UInt64) -> MissingFaultMemory.Area {
    let start: UInt64 = 0x5d00_0000_0000 + slot << 32
    return MissingFaultMemory.Area(AddressRange(start: start, end: start + UInt64(huge) * hugePage), pageSize: hugePage)
}

private func load(_ local: UInt64, _ length: Int = Int(pageSize)) -> [UInt8] {
    // SAFETY: `local..<local+length` is installed memory of a mapping the test keeps mapped.
    Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(local))!, count: length))
}

/// Whether `/proc/self/pagemap` says the page at `address` is present (no fault taken).
private func isPresent(_ address: UInt64) -> Bool {
    let fd = open("/proc/self/pagemap", O_RDONLY)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var entry: UInt64 = 0
    guard pread(fd, &entry, 8, off_t(address / pageSize * 8)) == 8 else { return false }
    return entry & (1 << 63) != 0
}

@Suite(.serialized)
struct HugetlbMissingFaultMemoryTests {
    @Test func hugePagesAreInstalledWholeOnceEveryPageArrived() throws {
        let pool = HugePagePool(pages: 4)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let area = hugeArea(4, slot: 1)
        let memory = try MissingFaultMemory.inOwnProcess(areas: [area])
        defer { memory.unmap() }
        #expect(memory.mappings[0].pageSize == hugePage && memory.mappings[0].atSourceAddress)
        // Backed by the hugetlb pool: the mapping's KernelPageSize is 2048 kB.
        #expect(kernelPageKiB(pid: getpid(), start: area.range.start) == 2048, "the area is not in 2 MiB pages")
        let reported = Mutex<[UInt64]>([])
        try memory.start { source in reported.withLock { $0.append(source) } }

        // Huge page 0: every page but the last, in two calls out of order: nothing installed yet.
        let first = AddressRange(start: area.range.start, end: area.range.start + hugePage)
        let bytes = sourceBytes(first)
        let half = Int(hugePage / 2)
        let partial = try bytes.withUnsafeBytes { all in
            try memory.install(AddressRange(start: first.start + UInt64(half), end: first.end - pageSize),
                               data: UnsafeRawBufferPointer(rebasing: all[half..<all.count - Int(pageSize)]))
                + memory.install(AddressRange(start: first.start, end: first.start + UInt64(half)),
                                 data: UnsafeRawBufferPointer(rebasing: all[0..<half]))
        }
        #expect(partial == 0)
        #expect(!memory.isInstalled(first.start) && !isPresent(first.start), "a partial huge page was installed")
        #expect(memory.statistics.hugePagesCopied == 0 && memory.installedPages == 0)
        // The last page completes it: one UFFDIO_COPY of the whole huge page.
        let calls = memory.statistics.installCalls
        let last = try bytes.withUnsafeBytes { all in
            try memory.install(AddressRange(start: first.end - pageSize, end: first.end),
                               data: UnsafeRawBufferPointer(rebasing: all[all.count - Int(pageSize)..<all.count]))
        }
        #expect(last == pagesPerHuge)
        #expect(memory.statistics.installCalls - calls == 1)
        #expect(memory.statistics.hugePagesCopied == 1 && memory.installedPages == pagesPerHuge)
        #expect(load(first.start, Int(hugePage)) == bytes)
        // Offered again: skipped, never copied twice.
        #expect(try bytes.withUnsafeBytes { try memory.install(first, data: $0) } == 0)
        #expect(memory.statistics.hugePagesCopied == 1)

        // Huge page 1: touched in its middle; reported once, at its start; filled in four pieces.
        let second = AddressRange(start: first.end, end: first.end + hugePage)
        let touched = second.start + 300 * pageSize + 8
        reported.withLock { $0.removeAll() }
        let secondBytes = sourceBytes(second)
        let woken = DispatchSemaphore(value: 0)
        let seenByToucher = Mutex<[UInt8]>([])
        Foundation.Thread.detachNewThread {
            let page = load(touched & ~(pageSize - 1))
            seenByToucher.withLock { $0 = page }
            woken.signal()
        }
        // Wait for the report, then deliver the huge page in pieces, as replies would.
        var waited = 0
        while reported.withLock({ $0.isEmpty }) && waited < 500 { usleep(2_000); waited += 1 }
        #expect(reported.withLock { $0 } == [second.start], "one report, at the huge page's start")
        let quarter = half / 2
        for piece in 0..<4 {
            #expect(woken.wait(timeout: .now()) == .timedOut, "the toucher woke before its huge page was whole")
            let range = AddressRange(start: second.start + UInt64(piece * quarter), end: second.start + UInt64((piece + 1) * quarter))
            try secondBytes.withUnsafeBytes { all in
                _ = try memory.install(range, data: UnsafeRawBufferPointer(rebasing: all[piece * quarter..<(piece + 1) * quarter]))
            }
        }
        #expect(woken.wait(timeout: .now() + 10) == .success, "the toucher was never woken")
        let seen = seenByToucher.withLock { $0 }
        let offset = Int((touched & ~(pageSize - 1)) - second.start)
        #expect(seen == Array(secondBytes[offset..<offset + Int(pageSize)]))
        #expect(load(second.start, Int(hugePage)) == secondBytes)

        // Huge page 2: all zeros (no UFFDIO_ZEROPAGE on hugetlb: staged zeros, copied whole).
        let third = AddressRange(start: second.end, end: second.end + hugePage)
        #expect(try memory.installZero(third) == pagesPerHuge)
        #expect(load(third.start, Int(hugePage)) == [UInt8](repeating: 0, count: Int(hugePage)))

        // Huge page 3: one page staged, then the migration fails: the whole huge page is poisoned.
        let fourth = AddressRange(start: third.end, end: third.end + hugePage)
        let one = try sourcePage(fourth.start).withUnsafeBytes {
            try memory.install(AddressRange(start: fourth.start, end: fourth.start + pageSize), data: $0)
        }
        #expect(one == 0)
        let error = memory.fail("the seeder went away")
        #expect(error == .abandoned(reason: "the seeder went away", pagesPoisoned: pagesPerHuge))
        #expect(memory.isComplete)
        // Neither the staged page nor any other reads: not zeros, not stale bytes.
        #expect(procMemory(pid: getpid(), at: fourth.start, length: Int(pageSize)) == nil)
        #expect(procMemory(pid: getpid(), at: fourth.end - pageSize, length: Int(pageSize)) == nil)
        let stats = memory.statistics
        #expect(stats.hugePagesCopied == 3 && stats.pagesCopied == 3 * pagesPerHuge && stats.pagesZeroed == 0, "\(stats)")
        #expect(stats.pagesPoisoned == pagesPerHuge && stats.kernelAlreadyPresent == 0)
    }

    @Test func aTouchedHugePageThatNeverArrivesKillsTheChildWithSIGBUS() throws {
        let pool = HugePagePool(pages: 2)
        defer { pool.restore() }
        if let reason = pool.unavailable {
            print("skipped: \(reason)")
            return
        }
        let child = try TestChild(pages: 4)
        defer { child.process.kill() }
        let area = hugeArea(2, slot: 2)
        let memory = try MissingFaultMemory.inProcess(pid: child.pid, areas: [area], faultTimeout: .milliseconds(400))
        defer { memory.finish() }
        let reported = Mutex<[UInt64]>([])
        try memory.start { source in
            reported.withLock { $0.append(source) }
            // Huge page 0 arrives (in two halves); huge page 1 never does.
            guard source == area.range.start else { return }
            let bytes = sourceBytes(AddressRange(start: source, end: source + hugePage))
            bytes.withUnsafeBytes { all in
                let half = all.count / 2
                _ = try? memory.install(AddressRange(start: source, end: source + UInt64(half)),
                                        data: UnsafeRawBufferPointer(rebasing: all[0..<half]))
                _ = try? memory.install(AddressRange(start: source + UInt64(half), end: source + hugePage),
                                        data: UnsafeRawBufferPointer(rebasing: all[half...]))
            }
        }
        // The child writes in the middle of huge page 0: blocks, gets its page whole, its write lands.
        let local = try #require(memory.localAddress(of: area.range.start + 100 * pageSize))
        try child.process.call("wat \(local + 8) 77")
        var expected = sourcePage(area.range.start + 100 * pageSize)
        withUnsafeBytes(of: UInt64(77).littleEndian) { expected.replaceSubrange(8..<16, with: $0) }
        #expect(procMemory(pid: child.pid, at: local, length: Int(pageSize)) == expected)
        #expect(procMemory(pid: child.pid, at: local - 100 * pageSize + hugePage - pageSize, length: Int(pageSize))
                == sourcePage(area.range.start + hugePage - pageSize))
        // Huge page 1, touched near its end: the fault timeout poisons it whole, the child dies of SIGBUS.
        let lost = try #require(memory.localAddress(of: area.range.end - 3 * pageSize))
        child.process.send("wat \(lost) 1")
        let status = child.process.child.waitForExit(timeout: 10)
        #expect(status == 128 + SIGBUS, "the child died of SIGBUS after the fault timeout, status \(String(describing: status))")
        #expect(reported.withLock { $0 } == [area.range.start, area.range.start + hugePage])
        let stats = memory.statistics
        #expect(stats.pagesPoisoned == pagesPerHuge && stats.hugePagesCopied == 1, "\(stats)")
        guard case .faultTimedOut(let source, _, _) = memory.failureReason else {
            Issue.record("expected a timeout, got \(String(describing: memory.failureReason))")
            return
        }
        #expect(source == area.range.start + hugePage)
    }
}
