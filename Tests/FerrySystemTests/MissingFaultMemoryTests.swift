// Post-copy memory in our own process: touches in any order see exactly the
// installed bytes, concurrent faults on one page resolve once, no page is
// installed twice, and a page that never arrives raises SIGBUS, never zeros.
import Testing
import Glibc
import Foundation
import Synchronization
@testable import FerrySystem

/// The "source": pages whose bytes are a function of their address.
private func sourcePage(_ address: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: Int(pageSize))
    var x = address &* 0x9E37_79B9_7F4A_7C15
    for i in stride(from: 0, to: bytes.count, by: 8) {
        x ^= x >> 29; x &*= 0xBF58_476D_1CE4_E5B9
        withUnsafeBytes(of: x) { bytes.replaceSubrange(i..<i + 8, with: $0) }
    }
    return bytes
}

/// A region of `pages` pages at an address unlikely to be taken in the test process.
private func testRegion(_ pages: Int, slot: UInt64) -> AddressRange {
    let start: UInt64 = 0x5e00_0000_0000 + slot << 32
    return AddressRange(start: start, end: start + UInt64(pages) * pageSize)
}

/// Reads the page at `local` with a plain load (this is what faults).
private func read(_ local: UInt64) -> [UInt8] {
    // SAFETY: `local` is a page of a mapping the test owns and keeps mapped.
    Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: UInt(local))!, count: Int(pageSize)))
}

/// Runs `body` on `count` threads at once and waits for all.
private func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let group = DispatchGroup()
    for index in 0..<count {
        group.enter()
        Foundation.Thread.detachNewThread {
            body(index)
            group.leave()
        }
    }
    group.wait()
}

/// The last SIGBUS address seen by `catchSIGBUS`'s handler.
private let sigbusAddress = Atomic<UInt>(0)
private let sigbusCode = Atomic<Int32>(0)

@Suite(.serialized)
struct MissingFaultMemoryTests {
    @Test func mapsAtTheSourceAddressWhenFreeAndElsewhereOtherwise() throws {
        let region = testRegion(4, slot: 1)
        let first = try MissingFaultMemory.inOwnProcess(regions: [region])
        defer { first.unmap() }
        #expect(first.mappings[0].atSourceAddress)
        #expect(first.localAddress(of: region.start + 5000) == region.start + 5000)
        // The same addresses again: taken now, so placed elsewhere with a lookup.
        let second = try MissingFaultMemory.inOwnProcess(regions: [region])
        defer { second.unmap() }
        #expect(!second.mappings[0].atSourceAddress)
        let local = try #require(second.localAddress(of: region.start + 5000))
        #expect(local == second.mappings[0].local + 5000)
        #expect(second.sourceAddress(of: local) == region.start + 5000)
        #expect(second.localAddress(of: region.end) == nil)
    }

    @Test func randomTouchesDuringBackgroundFillSeeExactlyTheSourceBytes() throws {
        let regions = [testRegion(512, slot: 2), testRegion(200, slot: 3)]
        let memory = try MissingFaultMemory.inOwnProcess(regions: regions)
        defer { memory.unmap() }
        // Faults are answered from another thread after a delay, like a fetch.
        let fetcher = DispatchQueue(label: "fetch")
        try memory.start { source in
            fetcher.asyncAfter(deadline: .now() + .microseconds(200)) {
                let bytes = sourcePage(source)
                _ = try? bytes.withUnsafeBytes { try memory.install(AddressRange(start: source, end: source + pageSize), data: $0) }
            }
        }
        // Background fill in 64-page batches, racing the faults.
        let fill = Foundation.Thread {
            for region in regions {
                var start = region.start
                while start < region.end {
                    let end = min(region.end, start + 64 * pageSize)
                    var bytes: [UInt8] = []
                    for page in stride(from: start, to: end, by: Int(pageSize)) { bytes += sourcePage(page) }
                    _ = try? bytes.withUnsafeBytes { try memory.install(AddressRange(start: start, end: end), data: $0) }
                    start = end
                    usleep(500)
                }
            }
        }
        fill.start()
        let mismatches = Atomic<Int>(0)
        onThreads(4) { seed in
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<150 {
                let region = regions[Int.random(in: 0..<regions.count, using: &generator)]
                let page = region.start + UInt64.random(in: 0..<region.pageCount, using: &generator) * pageSize
                if read(memory.localAddress(of: page)!) != sourcePage(page) { mismatches.add(1, ordering: .relaxed) }
            }
        }
        while !memory.isComplete { usleep(1000) }
        #expect(mismatches.load(ordering: .relaxed) == 0)
        for region in regions {
            for page in stride(from: region.start, to: region.end, by: Int(pageSize)) {
                #expect(read(memory.localAddress(of: page)!) == sourcePage(page))
            }
        }
        let stats = memory.statistics
        #expect(stats.pagesCopied == memory.totalPages, "every page installed exactly once: \(stats)")
        #expect(stats.kernelAlreadyPresent == 0)
        #expect(stats.faultCallbacks <= stats.faults)
        #expect(memory.failureReason == nil)
    }

    @Test func concurrentFaultsOnOnePageResolveOnce() throws {
        let region = testRegion(8, slot: 4)
        let memory = try MissingFaultMemory.inOwnProcess(regions: [region])
        defer { memory.unmap() }
        let target = region.start + 3 * pageSize
        let callbacks = Atomic<Int>(0)
        let bothInstalls = DispatchSemaphore(value: 0)
        try memory.start { source in
            callbacks.add(1, ordering: .relaxed)
            // Late, so every thread is blocked on the page before it lands; and twice, as a racing fetch would.
            DispatchQueue.global().asyncAfter(deadline: .now() + .milliseconds(100)) {
                let bytes = sourcePage(source)
                for _ in 0..<2 {
                    _ = try? bytes.withUnsafeBytes { try memory.install(AddressRange(start: source, end: source + pageSize), data: $0) }
                }
                bothInstalls.signal()
            }
        }
        let wrong = Atomic<Int>(0)
        onThreads(8) { _ in
            if read(memory.localAddress(of: target)!) != sourcePage(target) { wrong.add(1, ordering: .relaxed) }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
        #expect(bothInstalls.wait(timeout: .now() + 5) == .success)
        #expect(callbacks.load(ordering: .relaxed) == 1, "one fetch for eight touching threads")
        let stats = memory.statistics
        #expect(stats.pagesCopied == 1)
        #expect(stats.pagesAlreadyInstalled == 1, "the second install was skipped")
        #expect(stats.faultCallbacks == 1)
    }

    @Test func zeroPagesAndRunsUseOneIoctlPerRun() throws {
        let region = testRegion(64, slot: 5)
        let memory = try MissingFaultMemory.inOwnProcess(regions: [region])
        defer { memory.unmap() }
        try memory.start { _ in }
        // Pages 10..<20 first, then the whole region: the rest is two runs.
        let mid = AddressRange(start: region.start + 10 * pageSize, end: region.start + 20 * pageSize)
        #expect(try memory.installZero(mid) == 10)
        let before = memory.statistics.installCalls
        #expect(try memory.installZero(region) == 54)
        #expect(memory.statistics.installCalls - before == 2)
        #expect(memory.isComplete)
        #expect(read(memory.localAddress(of: region.start + 33 * pageSize)!) == [UInt8](repeating: 0, count: Int(pageSize)))
    }

    /// The program splits a region into VMAs while post-copy runs
    /// (mprotect): one UFFDIO_COPY cannot cross the boundary, so the run is
    /// split, and every page arrives with its bytes; nothing fails.
    @Test func aMappingSplitByTheProgramIsStillFilledWhole() throws {
        let region = testRegion(64, slot: 40)
        let memory = try MissingFaultMemory.inOwnProcess(regions: [region])
        defer { memory.unmap() }
        try memory.start { _ in }
        let local = try #require(memory.localAddress(of: region.start))
        // SAFETY: pages 20..<27 of the test's own mapping; still readable and writable.
        let split = UnsafeMutableRawPointer(bitPattern: UInt(local + 20 * pageSize))!
        #expect(mprotect(split, 7 * Int(pageSize), PROT_READ | PROT_WRITE | PROT_EXEC) == 0)
        var bytes: [UInt8] = []
        for page in stride(from: region.start, to: region.end, by: Int(pageSize)) { bytes += sourcePage(page) }
        #expect(try bytes.withUnsafeBytes { try memory.install(region, data: $0) } == 64)
        #expect(memory.isComplete)
        for page in stride(from: region.start, to: region.end, by: Int(pageSize)) {
            #expect(read(memory.localAddress(of: page)!) == sourcePage(page))
        }
        #expect(memory.statistics.pagesCopied == 64)
    }

    @Test func aPageThatNeverArrivesRaisesSIGBUSInTheToucherNotZeros() throws {
        let region = testRegion(4, slot: 6)
        let memory = try MissingFaultMemory.inOwnProcess(regions: [region], faultTimeout: .milliseconds(300))
        defer { memory.unmap() }
        try memory.start { _ in } // the "seeder" never answers
        let page = try #require(memory.localAddress(of: region.start + pageSize))
        // The handler makes the access survivable: it maps a fresh page over
        // the poisoned one and records where the SIGBUS hit.
        var action = sigaction()
        action.__sigaction_handler.sa_sigaction = { _, info, _ in
            let address = UInt(bitPattern: info!.pointee._sifields._sigfault.si_addr)
            sigbusAddress.store(address, ordering: .relaxed)
            sigbusCode.store(info!.pointee.si_code, ordering: .relaxed)
            let aligned = address & ~UInt(pageSize - 1)
            // SAFETY: replaces one page of the test's own mapping so the load can complete.
            _ = mmap(UnsafeMutableRawPointer(bitPattern: aligned), Int(pageSize), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        }
        action.sa_flags = SA_SIGINFO
        var previous = sigaction()
        sigaction(SIGBUS, &action, &previous)
        defer { sigaction(SIGBUS, &previous, nil) }
        sigbusAddress.store(0, ordering: .relaxed)
        let began = ContinuousClock.now
        onThreads(1) { _ in _ = read(page) }
        let waited = ContinuousClock.now - began
        #expect(sigbusAddress.load(ordering: .relaxed) == UInt(page), "the toucher got SIGBUS at its page")
        #expect(sigbusCode.load(ordering: .relaxed) == 2 /* BUS_ADRERR */)
        #expect(waited >= .milliseconds(250) && waited < .seconds(5), "blocked about the timeout: \(waited)")
        guard case .faultTimedOut(let source, _, _) = memory.failureReason else {
            Issue.record("expected a timeout, got \(String(describing: memory.failureReason))")
            return
        }
        #expect(source == region.start + pageSize)
        #expect("\(memory.failureReason!)".contains("0x\(String(region.start + pageSize, radix: 16))"))
    }

    @Test func failPoisonsEveryMissingPageAndKeepsTheInstalledOnes() throws {
        let region = testRegion(16, slot: 7)
        let memory = try MissingFaultMemory.inOwnProcess(regions: [region])
        defer { memory.unmap() }
        try memory.start { _ in }
        let bytes = sourcePage(region.start)
        try bytes.withUnsafeBytes { _ = try memory.install(AddressRange(start: region.start, end: region.start + pageSize), data: $0) }
        let error = memory.fail("the seeder went away")
        #expect(error == .abandoned(reason: "the seeder went away", pagesPoisoned: 15))
        #expect(memory.isComplete, "nothing left to wait for")
        #expect(read(memory.localAddress(of: region.start)!) == bytes)
        // A poisoned page cannot be read even by the kernel on our behalf: EFAULT, not zeros.
        var buffer = [UInt8](repeating: 0xAA, count: Int(pageSize))
        let mem = open("/proc/self/mem", O_RDONLY)
        defer { close(mem) }
        let result = buffer.withUnsafeMutableBytes {
            pread(mem, $0.baseAddress, Int(pageSize), off_t(memory.localAddress(of: region.start + 2 * pageSize)!))
        }
        #expect(result < 0, "errno \(errno)")
        #expect(buffer.allSatisfy { $0 == 0xAA })
        #expect(memory.statistics.pagesPoisoned == 15)
    }

    // MARK: - In another process

    @Test func anotherProcessOwnsTheMemoryAndItsTouchesAreFilledFromHere() throws {
        let child = try TestChild(pages: 4)
        defer { child.process.kill() }
        let region = testRegion(8, slot: 8)
        let memory = try MissingFaultMemory.inProcess(pid: child.pid, regions: [region], faultTimeout: .seconds(10))
        defer { memory.finish() }
        #expect(memory.mappings[0].atSourceAddress, "the address is free in the child")
        try memory.start { source in
            let bytes = sourcePage(source)
            _ = try? bytes.withUnsafeBytes { try memory.install(AddressRange(start: source, end: source + pageSize), data: $0) }
        }
        // Installed from here before any touch: the child sees it.
        let first = sourcePage(region.start)
        try first.withUnsafeBytes { _ = try memory.install(AddressRange(start: region.start, end: region.start + pageSize), data: $0) }
        // The child writes to a missing page: it blocks, we install, its write lands on our bytes.
        let target = region.start + 3 * pageSize
        let local = try #require(memory.localAddress(of: target))
        try child.process.call("wat \(local + 8) 77")
        let mem = open("/proc/\(child.pid)/mem", O_RDONLY)
        defer { close(mem) }
        var page = [UInt8](repeating: 0, count: Int(pageSize))
        #expect(page.withUnsafeMutableBytes { pread(mem, $0.baseAddress, Int(pageSize), off_t(local)) } == Int(pageSize))
        var expected = sourcePage(target)
        withUnsafeBytes(of: UInt64(77).littleEndian) { expected.replaceSubrange(8..<16, with: $0) }
        #expect(page == expected)
        #expect(page.withUnsafeMutableBytes { pread(mem, $0.baseAddress, Int(pageSize), off_t(region.start)) } == Int(pageSize))
        #expect(page == first)
        let stats = memory.statistics
        #expect(stats.faultCallbacks == 1 && stats.pagesCopied == 2)
    }

    @Test func aChildTouchingAPageThatCannotArriveDiesOfSIGBUSNotZeros() throws {
        let child = try TestChild(pages: 4)
        defer { child.process.kill() }
        let region = testRegion(4, slot: 9)
        let memory = try MissingFaultMemory.inProcess(pid: child.pid, regions: [region], faultTimeout: .milliseconds(300))
        defer { memory.finish() }
        try memory.start { _ in } // the seeder never answers
        let local = try #require(memory.localAddress(of: region.start + pageSize))
        child.process.send("wat \(local) 1")
        let status = child.process.child.waitForExit(timeout: 10)
        #expect(status == 128 + SIGBUS, "the child died of SIGBUS after the fault timeout, status \(String(describing: status))")
        #expect(memory.statistics.pagesPoisoned == 1)
    }
}

extension MissingFaultMemoryTests {
    /// The comm (process name) of `pid`, nil once it is gone or a zombie.
    private func liveName(_ pid: Int32) -> String? {
        let fd = open("/proc/\(pid)/stat", O_RDONLY)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        let stat = n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self) : ""
        guard let left = stat.firstIndex(of: "("), let right = stat.lastIndex(of: ")"), !stat.contains(") Z ") else { return nil }
        return String(stat[stat.index(after: left)..<right])
    }

    @Test func memoryInAnotherProcessHasAGuardianUntilFinished() throws {
        let child = try TestChild(pages: 4)
        defer { child.process.kill() }
        let region = testRegion(4, slot: 10)
        let memory = try MissingFaultMemory.inProcess(pid: child.pid, regions: [region], faultTimeout: .seconds(10))
        let guardian = try #require(memory.guardianPid)
        // Named by itself once it runs.
        var waited = 0
        while liveName(guardian) != "ferry-guardian" && waited < 200 { usleep(5_000); waited += 1 }
        #expect(liveName(guardian) == "ferry-guardian")
        let data = [UInt8](repeating: 0x5A, count: Int(region.length))
        try data.withUnsafeBytes { _ = try memory.install(region, data: $0) }
        memory.finish()
        #expect(liveName(guardian) == nil, "finish() dismissed and reaped the guardian")
        // In our own process nothing can outlive us: no guardian.
        let own = try MissingFaultMemory.inOwnProcess(regions: [testRegion(1, slot: 11)])
        defer { own.unmap() }
        #expect(own.guardianPid == nil)
    }
}
